"""Each head's hot loop at two sizes, before and after, with its FLOPs and achieved GFLOP/s.

    nice -n 10 .venv/bin/python benchmarks/hot_loops.py    # both sizes, old and new, one run

Sizes: N=60,000, d=1280, K=10 (Fashion-MNIST-like) and N=1,281,167, d=1280, K=1000
(ImageNet-1k-like). The data is synthetic and streamed chunk by chunk as from a store (one
4096-row chunk in memory; the full 1.28M x 1280 float32 would be 6.5 GB): every number is one
jitted call on one chunk (median of --repeats warm calls), scaled to a pass over N rows or to a
step. The reference rate is a plain jitted X^T X on the same chunk, measured in the same run:
the machine's matmul rate. "old" is the kernel of the commit before this benchmark's change
(kept here as the reference), "new" the head's kernel now.

At K=1000, DP-Newton is timed on blocks of --newton-classes classes (per-step time scaled by
K / that), and then once on the block size the head really uses at its default 1 GB Hessian
budget, which also records the process's peak memory. Prints Markdown tables to record in
benchmarks/RESULTS.md with the machine and load.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.heads import dp_newton
from pipeline_lib.heads.logistic_dp import _bound, _clipped_grad_sum_jit, sub_batch_rows
from pipeline_lib.heads.stats import StatsMemo, _chunk_stats

SIZES = ((60_000, 10), (1_281_167, 1000))


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@partial(
    jax.jit,
    static_argnames=("num_classes", "residual_bound", "hessian_weight_bound"),
    donate_argnums=(0, 1),
)
def old_newton_chunk(
    grad, hess, xa, labels, mask, weights, classes, *, num_classes, residual_bound,
    hessian_weight_bound,
):  # fmt: skip
    """The kernel before: every class's full (d+1) x (d+1) product."""
    logits = xa @ weights
    r = dp_newton.clipped_residuals(
        logits, labels, num_classes=num_classes, residual_bound=residual_bound
    )
    r = r * mask[:, None]
    a = dp_newton.hessian_weights(logits, hessian_weight_bound=hessian_weight_bound)
    a = a[:, classes] * mask[:, None]
    grad = grad + xa.T @ r[:, classes]

    def one_class(j, h):
        return h.at[j].add((xa * a[:, j][:, None]).T @ xa)

    return grad, jax.lax.fori_loop(0, classes.shape[0], one_class, hess)


class _FakeStore:
    """What the DP-FC memo looks up: a digest and a directory with a store's file count."""

    def __init__(self, path: Path, files: int):
        self.path, self.content_digest = path, "0" * 64
        for i in range(files):
            (path / f"c{i}").write_bytes(b"x")


def one_size(big_n, k, a, rss0) -> tuple[list, list]:
    n, d = a.rows, a.feature_dim
    chunks = -(-big_n // n)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((n, d), np.float32))
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)  # as after bound_rows
    y = jnp.asarray(rng.integers(0, k, n).astype(np.int32))
    mask = jnp.ones(n, jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, k)).astype(np.float32) * 0.01)
    b = jnp.zeros(k, jnp.float32)
    rows, notes = [], []

    gram = jax.jit(lambda x: x.T @ x)
    t_ref = timed(lambda: gram(x), a.repeats)
    peak = 2 * n * d * d / t_ref / 1e9
    rows.append(("reference: X^T X, one chunk", "", 2 * n * d * d, t_ref, t_ref))

    t = timed(
        lambda: _chunk_stats(x, y, mask, num_classes=k, l2_clip_norm=1.0, transform="normalize"),
        a.repeats,
    )
    rows.append(("DP-LS statistics (X^T X, X^T Y): one pass", "same", 2 * n * d * d, t, t * chunks))

    # DP-Newton: a per-class step's gradient + Hessians, on blocks of b classes
    b_time = min(k, a.newton_classes)
    cls = jnp.arange(b_time, dtype=jnp.int32)
    kw = dict(num_classes=k, residual_bound=1.0, hessian_weight_bound=1.0)
    frac = dp_newton.hessian_tile_flop_fraction(d)
    logit_flops = 2 * n * d * k + 2 * n * d * b_time
    for tag, kernel, hess_flops in (
        ("old", old_newton_chunk, 2 * n * d * d),
        ("new", dp_newton.accumulate_chunk, 2 * n * d * d * frac),
    ):

        def newton(kernel=kernel):
            grad = jnp.zeros((d, b_time), jnp.float32)
            hess = jnp.zeros((b_time, d, d), jnp.float32)
            g, h = kernel(grad, hess, x, y, mask, w, cls, **kw)
            return g, dp_newton.mirror_hessians(h) if kernel is not old_newton_chunk else h

        t = timed(newton, a.repeats)
        flops = b_time * hess_flops + logit_flops
        rows.append(
            (f"DP-Newton step: gradient + Hessians, {b_time} classes per call", tag, flops, t,
             t * chunks * k / b_time)
        )  # fmt: skip
    block = dp_newton.hessian_class_block_size(
        augmented_dim=d, num_classes=k, max_hessian_bytes=dp_newton.DPNewton().max_hessian_bytes
    )
    if block > b_time:  # the head's real block: one call, and the memory it takes
        blocks = -(-k // block)
        cls = jnp.arange(block, dtype=jnp.int32)
        args = (jnp.zeros((d, block), jnp.float32), jnp.zeros((block, d, d), jnp.float32))
        run = dp_newton.accumulate_chunk.lower(*args, x, y, mask, w, cls, **kw).compile()
        t0 = time.perf_counter()
        jax.block_until_ready(dp_newton.mirror_hessians(run(*args, x, y, mask, w, cls)[1]))
        t = time.perf_counter() - t0
        flops = block * 2 * n * d * d * frac + 2 * n * d * (k + block)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append(
            (f"DP-Newton step: the head's block of {block} classes (1 call)", "new", flops, t,
             t * chunks * blocks)
        )  # fmt: skip
        notes.append(
            f"DP-Newton at K={k}: blocks of {block} classes ({blocks} passes per step), "
            f"{block * d * d * 4 / 1e9:.2f} GB of Hessian accumulators; peak RSS of this "
            f"benchmark process {rss / 1e9:.2f} GB (at start {rss0 / 1e9:.2f} GB)"
        )

    # DP-FC's covariance X~^T X~: every run before, once per store and bounds now
    t_cov = timed(lambda: gram(jnp.concatenate([x, jnp.ones((n, 1))], axis=1)), a.repeats)
    rows.append(("DP-FC covariance X~^T X~, per run", "old", 2 * n * (d + 1) ** 2, t_cov,
                 t_cov * chunks))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        memo, fake = StatsMemo(), _FakeStore(Path(tmp), chunks + 4)
        value = np.zeros((d + 1, d + 1))
        memo.get(fake, ("p",), lambda: value)
        hits = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            memo.get(fake, ("p",), lambda: value)
            hits.append(time.perf_counter() - t0)
    t = statistics.median(hits)
    rows.append(("DP-FC covariance X~^T X~, per run after the first of a store", "new (memo)",
                 0, t, t))  # fmt: skip

    t = timed(lambda: _clipped_grad_sum_jit(w, b, x, y, mask, l2_grad_clip=1.0), a.repeats)
    rows.append(("DP-FC / DP-SGD clipped gradient sum: one pass", "same", 4 * n * d * k, t,
                 t * chunks))  # fmt: skip
    sub = x[: a.batch]
    t = timed(
        lambda: _clipped_grad_sum_jit(w, b, sub, y[: a.batch], mask[: a.batch], l2_grad_clip=1.0),
        a.repeats,
    )
    rows.append((f"DP-SGD step (batch {a.batch})", "same", 4 * a.batch * d * k, t, t))
    # DP-SGD on a streamed store: every step reads every chunk to draw its Poisson batch.
    # Before, each whole chunk was bounded (bound_rows); now only the sampled rows are.
    bound = partial(_bound, l2_clip_norm=1.0, transform="normalize")
    sub_rows = sub_batch_rows(a.batch)
    t = timed(lambda: bound(x), a.repeats)
    rows.append(("DP-SGD streamed step: bound_rows of the rows read", "old", 0, t, t * chunks))
    t = timed(lambda: bound(x[:sub_rows]), a.repeats)
    rows.append(("DP-SGD streamed step: bound_rows of the rows read", "new", 0, t, t))
    t_end = timed(lambda: gram(x), a.repeats)  # the load changes: keep the faster reference
    peak = max(peak, 2 * n * d * d / t_end / 1e9)
    notes.append(
        f"matmul rate (X^T X on one chunk) {2 * n * d * d / t_ref / 1e9:.0f} GFLOP/s before "
        f"these loops, {2 * n * d * d / t_end / 1e9:.0f} after; fractions are of the higher"
    )
    return [(name, tag, flops, tc, tt, peak) for name, tag, flops, tc, tt in rows], notes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--feature-dim", type=int, default=1280)
    p.add_argument("--rows", type=int, default=4096, help="chunk rows (one jitted call)")
    p.add_argument("--batch", type=int, default=2048, help="DP-SGD expected batch")
    p.add_argument("--newton-classes", type=int, default=16, help="DP-Newton classes per call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--sizes", default=",".join(f"{n}:{k}" for n, k in SIZES), help="N:K pairs (smoke tests)"
    )
    a = p.parse_args()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()
    out = []
    for big_n, k in (map(int, pair.split(":")) for pair in a.sizes.split(",")):
        rows, notes = one_size(big_n, k, a, rss0)
        out.append((big_n, k, rows, notes))
    load = os.getloadavg()
    print(
        f"{start}; d={a.feature_dim}, chunk {a.rows} rows; {os.cpu_count()} CPUs shared; "
        f"load {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at start, "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at end; JAX {jax.__version__} "
        f"{jax.default_backend()}"
    )
    for big_n, k, rows, notes in out:
        print(f"\n**N = {big_n:,}, K = {k}**\n")
        print(
            "| loop | kernel | GFLOP per call | s per call | GFLOP/s | of matmul rate "
            "| s per pass/step |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, tag, flops, t_call, t_total, peak in rows:
            rate = flops / t_call / 1e9
            share = f"{rate / peak:.0%}" if flops else "—"
            print(
                f"| {name} | {tag} | {flops / 1e9:.2f} | {t_call:.4f} | {rate:.0f} | "
                f"{share} | {t_total:.2f} |"
            )
        for note in notes:
            print(f"\n{note}")


if __name__ == "__main__":
    main()
