"""Private tuning at equal total epsilon: composition vs repeat-and-select, G = 3, 10, 30.

For each grid size G the DP-LS ridge factor takes G log-spaced values; every run is a real
`run_head` (secret noise, its own DpEvent and metrics) on an existing feature store pair, and
the test accuracy is compared at the same target (epsilon, delta) that covers the whole
search. An untuned DP-LS at the default ridge factor (epsilon does NOT cover its choice) is
the reference.

    python benchmarks/tuning.py --train results/features/.../train.zarr \
        --test results/features/.../test.zarr --epsilons 1 3 --grids 3 10 30 --seeds 3

Writes a Markdown table (median and min-max over seeds) to stdout and, with --out, to a file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline_lib import experiments as xp
from pipeline_lib.features.split import RowSubset
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads.stats import compute_stats, save_stats
from pipeline_lib.runner import run_head

DELTA = 1e-5


def _config(root: Path, name: str, epsilons, seeds, methods, tuning=None) -> dict:
    exp = {
        "dataset": "data",
        "backbone": "efficientnet_lite0",
        "image_size": 128,
        "epsilons": list(epsilons),
        "delta": DELTA,
        "seeds": list(range(seeds)),
        "methods": methods,
    }
    if tuning:
        exp["tuning"] = tuning
    return {
        "results_dir": str(root),
        "datasets": {"data": {"source": "fashion_mnist"}},
        "experiments": {name: exp},
    }


def _stats(train: FeatureStore, run: dict, cache: dict) -> None:
    for cand in run["candidates"]:
        path = cand.get("stats_file")
        if path and path not in cache:
            data = (
                train
                if run["part"] == "all"
                else RowSubset(train, part="fit", fraction=float(run["part"][3:]))
            )
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            kw = dict(l2_clip_norm=cand["l2_clip_norm"], transform=cand["transform"])
            save_stats(compute_stats(data, **kw), path)
            cache[path] = True


def run_all(cfg: dict, train_path: str, test_path: str, cache: dict) -> list[dict]:
    train = FeatureStore(train_path)
    records = []
    for run in xp.expand_runs(cfg):
        _stats(train, run, cache)
        out = xp.run_outputs(cfg, run)
        records.append(
            run_head(
                run,
                train_store=train_path,
                test_store=test_path,
                metrics_path=out["metrics"],
                head_path=out["head"],
            )
        )
    return records


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--grids", type=int, nargs="+", default=[3, 10, 30])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    cache: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        ref = run_all(
            _config(root, "untuned", args.epsilons, args.seeds, {"dp_ls": {}}),
            args.train,
            args.test,
            cache,
        )
        rows.append(("untuned (ε does not cover the choice)", 1, ref))
        for g in args.grids:
            grid = [float(v) for v in np.geomspace(0.02, 4.0, g)]
            for selection in ("private", "repeat_and_select"):
                tuning = {"selection": selection, "validation_fraction": 0.1}
                cfg = _config(
                    root, f"{selection}_G{g}", args.epsilons, args.seeds,
                    {"dp_ls": {"ridge_noise_factor": grid}}, tuning,
                )  # fmt: skip
                rows.append((selection, g, run_all(cfg, args.train, args.test, cache)))
        elapsed = time.perf_counter() - t0

    lines = [
        "| selection | G | " + " | ".join(f"ε = {e:g}" for e in args.epsilons) + " |",
        "|---|---:|" + "---:|" * len(args.epsilons),
    ]
    for selection, g, records in rows:
        cells = []
        for eps in args.epsilons:
            acc = [100 * r["test_accuracy"] for r in records if r["target_epsilon"] == eps]
            cells.append(f"{statistics.median(acc):.2f} ({min(acc):.2f}–{max(acc):.2f})")
        lines.append(f"| {selection} | {g} | " + " | ".join(cells) + " |")
    n = FeatureStore(args.train).num_examples
    lines += [
        "",
        f"DP-LS on {args.train} (N = {n}), δ = {DELTA:g}, test accuracy (%) median "
        f"(min–max) over {args.seeds} seeds; ridge_noise_factor grid log-spaced in "
        f"[0.02, 4]; validation fraction 0.1; repeat-and-select: geometric law, mean = G "
        f"trials, RDP accountant. Total {elapsed:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
