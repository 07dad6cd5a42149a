"""Private feature centring (``center: true``) vs none, DP-LS and DP-FC, at equal epsilon.

Every run is a real `run_head` (secret noise, its own DpEvent, metrics.json and head.npz)
with the heads' default hyperparameters; the centred runs spend the same target
(epsilon, delta), of which the noisy mean gets ``center_share`` (default 0.02).

    python benchmarks/centering.py \
        --features results/features/fashion_mnist/efficientnet_lite0/128px \
        --epsilons 1 3 --seeds 3 --out /tmp/centering.jsonl

``--features`` holds train.zarr and test.zarr: verified stores are opened as
`FeatureStore`; a store without a manifest (an older extraction) is read into
`InMemoryFeatures` with ``--allow-unverified`` (exploration only, said in the output).
Prints one JSON line per run and a Markdown table (median, min-max over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline_lib import experiments as xp
from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.features.store import FeatureStore, StoreError
from pipeline_lib.heads.stats import compute_stats, save_stats
from pipeline_lib.runner import run_head

DELTA = 1e-5
METHODS = {"dp_ls": {}, "dp_fc": {}}


def _unverified(path: Path) -> InMemoryFeatures:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    data = InMemoryFeatures(
        np.asarray(group["features"]),
        np.asarray(group["labels"]),
        num_classes=int(attrs["num_classes"]),
        chunk_rows=int(attrs.get("chunk_rows", 1024)),
    )
    data.attrs = attrs
    return data


def opener(allow_unverified: bool):
    cache: dict = {}

    def open_store(path):
        path = Path(path)
        if path not in cache:
            try:
                cache[path] = FeatureStore(path)
            except (StoreError, FileNotFoundError, OSError) as exc:
                if not allow_unverified:
                    raise
                print(f"# {path}: not a verified store ({type(exc).__name__}); read in memory")
                cache[path] = _unverified(path)
        return cache[path]

    return open_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", required=True, type=Path)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS))
    ap.add_argument("--center-share", type=float, default=None)
    ap.add_argument("--allow-unverified", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    args = ap.parse_args()
    open_store = opener(args.allow_unverified)
    train_path, test_path = args.features / "train.zarr", args.features / "test.zarr"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for method in args.methods:
            for center in (False, True):
                hp = dict(METHODS[method])
                if center:
                    hp["center"] = True
                    if args.center_share is not None:
                        hp["center_share"] = args.center_share
                exp = {
                    "dataset": "data",
                    "backbone": "efficientnet_lite0",
                    "image_size": 128,
                    "epsilons": list(args.epsilons),
                    "delta": DELTA,
                    "seeds": list(range(args.seeds)),
                    "methods": {method: hp},
                }
                cfg = {
                    "results_dir": str(root),
                    "datasets": {"data": {"source": "fashion_mnist"}},
                    "experiments": {f"c{int(center)}": exp},
                }
                for run in xp.expand_runs(cfg):
                    for cand in run["candidates"]:
                        path = cand.get("stats_file")
                        if path and not Path(path).exists():
                            Path(path).parent.mkdir(parents=True, exist_ok=True)
                            kw = dict(
                                l2_clip_norm=cand["l2_clip_norm"], transform=cand["transform"]
                            )
                            save_stats(compute_stats(open_store(train_path), **kw), path)
                    out = xp.run_outputs(cfg, run)
                    t = time.perf_counter()
                    record = run_head(
                        run,
                        train_store=train_path,
                        test_store=test_path,
                        metrics_path=out["metrics"],
                        head_path=out["head"],
                        open_store=open_store,
                    )
                    row = {
                        "method": method,
                        "center": center,
                        "epsilon": run["epsilon"],
                        "seed": run["seed"],
                        "test_accuracy": record["test_accuracy"],
                        "spent_epsilon": record["spent_epsilon"],
                        "noise_multipliers": record["noise_multipliers"],
                        "center_share": (record.get("feature_center") or {}).get("share"),
                        "wall_s": round(time.perf_counter() - t, 1),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print("\n| method | ε | no centring | private centring | Δ (median) |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        for eps in args.epsilons:
            cells = []
            meds = []
            for center in (False, True):
                acc = [
                    100 * r["test_accuracy"]
                    for r in rows
                    if r["method"] == method and r["center"] == center and r["epsilon"] == eps
                ]
                meds.append(statistics.median(acc))
                cells.append(f"{meds[-1]:.2f} ({min(acc):.2f}–{max(acc):.2f})")
            print(f"| {method} | {eps:g} | {cells[0]} | {cells[1]} | {meds[1] - meds[0]:+.2f} |")


if __name__ == "__main__":
    main()
