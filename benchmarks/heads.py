"""Time and peak memory of every head, on synthetic feature stores on disk.

    .venv/bin/python benchmarks/heads.py --size default            # N=60k, d=1280, K=10
    .venv/bin/python benchmarks/heads.py --size imagenet --methods dp_ls,dp_fc   # N=1.28M, K=1000

Each (method, size) runs in a fresh subprocess so that its peak RSS
(ru_maxrss) is its own. Stores are written once under --workdir and reused.
Results are appended as JSON lines to --out and printed as a table; record
them in benchmarks/RESULTS.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private

SIZES = {
    "tiny": dict(num_examples=20_000, feature_dim=256, num_classes=10),
    "default": dict(num_examples=60_000, feature_dim=1280, num_classes=10),
    "imagenet": dict(num_examples=1_281_167, feature_dim=1280, num_classes=1000),
}


def make_store(path: Path, *, num_examples, feature_dim, num_classes, chunk_rows=4096, seed=0):
    """Class-conditional Gaussian features (nonnegative like ReLU6 pre-logits), chunk by chunk."""
    import numpy as np

    from pipeline_lib.features import store as fs

    if path.exists():
        return
    attrs = dict(
        backbone="synthetic",
        checkpoint_sha256="-",
        preprocessing="synthetic",
        image_size=0,
        dataset="synthetic",
        split=path.stem,
        num_classes=num_classes,
    )
    fs.create_store(
        path, num_examples=num_examples, feature_dim=feature_dim, chunk_rows=chunk_rows, attrs=attrs
    )
    rng = np.random.default_rng(12345)  # the same class centres for train and test
    centers = 0.15 * rng.gamma(0.5, 1.0, size=(num_classes, feature_dim)).astype(np.float32)
    for c in fs.pending_chunks(path):
        a, b = fs.chunk_bounds(c, num_examples, chunk_rows)
        r = np.random.default_rng([seed, c])
        y = r.integers(0, num_classes, b - a).astype(np.int32)
        x = centers[y] + r.gamma(0.5, 1.0, size=(b - a, feature_dim)).astype(np.float32)
        fs.write_chunk(path, c, x, y)
    fs.finalize_store(path)


def run_one(method: str, train: str, test: str, hyper: dict, epsilon: float, delta: float):
    """In the child: statistics (if any), calibration, fit, evaluation; timings in seconds."""
    from pipeline_lib.features.store import FeatureStore
    from pipeline_lib.heads import STATS_HEADS, make_head
    from pipeline_lib.heads.linear import accuracy
    from pipeline_lib.heads.stats import compute_stats

    timings = {}
    store, test_store = FeatureStore(train), FeatureStore(test)
    head = make_head(method, hyper)
    data = store
    if method in STATS_HEADS:
        t = time.perf_counter()
        data = compute_stats(
            store, l2_clip_norm=head.l2_clip_norm, transform=head.feature_transform
        )
        timings["statistics"] = time.perf_counter() - t
    if head.private:
        t = time.perf_counter()
        kwargs = {"num_examples": store.num_examples} if _needs_n(head) else {}
        head = head.calibrate(epsilon=epsilon, delta=delta, **kwargs)
        timings["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    params = head.fit(data, key=rk(0))
    timings["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    acc = accuracy(
        test_store,
        params["weights"],
        params["bias"],
        l2_clip_norm=head.l2_clip_norm,
        transform=head.feature_transform,
    )
    timings["evaluate"] = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"timings_s": timings, "peak_rss_mb": peak_mb, "test_accuracy": acc}


def _needs_n(head) -> bool:
    import inspect

    return "num_examples" in inspect.signature(head.calibrate).parameters


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--methods", default="dp_ls,nonprivate_ridge")
    p.add_argument("--hyper", default="{}", help='JSON per method, e.g. {"dp_fc": {"steps": 2}}')
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=None, help="default: 1/(10 N)")
    p.add_argument("--workdir", default="/tmp/dp_heads_bench")
    p.add_argument("--out", default="benchmarks/heads_results.jsonl")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_one(**spec)))
        return

    size = SIZES[args.size]
    work = Path(args.workdir) / args.size
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_store(work / "train.zarr", **size)
    make_store(work / "test.zarr", **dict(size, num_examples=10_000), seed=1)
    print(f"stores ready in {time.perf_counter() - t:.0f} s under {work}", flush=True)
    delta = args.delta or 1.0 / (10 * size["num_examples"])
    hyper = json.loads(args.hyper)
    for method in args.methods.split(","):
        spec = dict(
            method=method,
            train=str(work / "train.zarr"),
            test=str(work / "test.zarr"),
            hyper=hyper.get(method, {}),
            epsilon=args.epsilon,
            delta=delta,
        )
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(f"{method}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(
            method=method,
            size=args.size,
            **size,
            epsilon=args.epsilon,
            delta=delta,
            hyperparameters=spec["hyper"],
            wall_s=time.perf_counter() - t,
            machine=f"{platform.node()} {platform.processor()} {os.cpu_count()} cpus",
            date=time.strftime("%Y-%m-%d %H:%M"),
        )
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        tm = ", ".join(f"{k} {v:.1f}s" for k, v in result["timings_s"].items())
        print(
            f"{args.size:9s} {method:20s} peak RSS {result['peak_rss_mb']:8.0f} MB  {tm}  "
            f"acc {result['test_accuracy']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
