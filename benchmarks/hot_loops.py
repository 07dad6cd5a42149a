"""Each head's hot loop, timed warm on random data, with its FLOPs and achieved GFLOP/s.

    .venv/bin/python benchmarks/hot_loops.py                     # N=60k, d=1280, K=10
    .venv/bin/python benchmarks/hot_loops.py --num-classes 1000 --rows 4096 --num-examples 1281167

Every number is per pass over N rows (or per step for DP-SGD), extrapolated from the median of
--repeats timings of one jitted call on one chunk (4096 rows), after a warm-up call. The
reference rate is a plain jitted X^T X on the same chunk: the machine's measured matmul rate.
Prints a Markdown table to record in benchmarks/RESULTS.md with the machine and load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.heads import dp_newton
from pipeline_lib.heads.logistic_dp import _clipped_grad_sum_jit
from pipeline_lib.heads.stats import _chunk_stats


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-examples", type=int, default=60_000)
    p.add_argument("--feature-dim", type=int, default=1280)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rows", type=int, default=4096, help="chunk rows (one jitted call)")
    p.add_argument("--batch", type=int, default=2048, help="DP-SGD expected batch")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    n, d, k, big_n = a.rows, a.feature_dim, a.num_classes, a.num_examples
    chunks = -(-big_n // n)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((n, d), np.float32))
    y = jnp.asarray(rng.integers(0, k, n).astype(np.int32))
    mask = jnp.ones(n, jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, k)).astype(np.float32) * 0.01)
    b = jnp.zeros(k, jnp.float32)
    rows = []

    gram = jax.jit(lambda x: x.T @ x)
    t = timed(lambda: gram(x), a.repeats)
    peak = 2 * n * d * d / t / 1e9
    rows.append(("reference: X^T X, one chunk", 2 * n * d * d, t, t))

    t = timed(
        lambda: _chunk_stats(x, y, mask, num_classes=k, l2_clip_norm=1.0, transform="normalize"),
        a.repeats,
    )
    rows.append(("DP-LS statistics (X^T X, X^T Y): one pass", 2 * n * d * d, t, t * chunks))

    xa = jnp.concatenate([x, jnp.ones((n, 1), jnp.float32)], axis=1)
    wa = jnp.concatenate([w, b[None]], axis=0)
    cls = jnp.arange(k, dtype=jnp.int32)

    def newton():
        grad = jnp.zeros((d + 1, k), jnp.float32)
        hess = jnp.zeros((k, d + 1, d + 1), jnp.float32)
        return dp_newton.accumulate_chunk(
            grad, hess, xa, y, mask, wa, cls, num_classes=k, residual_bound=1.0,
            hessian_weight_bound=1.0,
        )  # fmt: skip

    if k * (d + 1) ** 2 * 4 <= 4e9:
        t = timed(newton, a.repeats)
        flops = k * 2 * n * (d + 1) ** 2 + 4 * n * (d + 1) * k
        rows.append((f"DP-Newton step: gradient + {k} Hessians, one pass", flops, t, t * chunks))

    t = timed(lambda: _clipped_grad_sum_jit(w, b, x, y, mask, l2_grad_clip=1.0), a.repeats)
    rows.append(("DP-FC / DP-SGD clipped gradient sum: one pass", 4 * n * d * k, t, t * chunks))
    sub = x[: a.batch]
    t = timed(
        lambda: _clipped_grad_sum_jit(w, b, sub, y[: a.batch], mask[: a.batch], l2_grad_clip=1.0),
        a.repeats,
    )
    rows.append((f"DP-SGD step (batch {a.batch})", 4 * a.batch * d * k, t, t))

    load = os.getloadavg()
    print(
        f"N={big_n}, d={d}, K={k}, chunk {n} rows; {os.cpu_count()} CPUs shared; "
        f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; JAX {jax.__version__} "
        f"{jax.default_backend()}\n"
    )
    print("| loop | GFLOP per call | s per call | GFLOP/s | of matmul rate | s per pass/step |")
    print("|---|---|---|---|---|---|")
    for name, flops, t_call, t_total in rows:
        rate = flops / t_call / 1e9
        print(
            f"| {name} | {flops / 1e9:.2f} | {t_call:.4f} | {rate:.0f} | {rate / peak:.0%} | "
            f"{t_total:.2f} |"
        )


if __name__ == "__main__":
    main()
