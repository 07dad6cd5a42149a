"""Table of feature sets: extraction cost and non-private probe accuracy per store pair.

Reads a workflow's results (verified stores and the runs' metrics.json) for every
experiment of its experiments file, and prints one Markdown row per experiment:
N train/test, feature dim, extraction time and throughput (from the stores'
``extraction_stats``, summed over train and test; for combinations, the time of the
combine job; a store whose extraction was killed and resumed counts only the images of
its last job), and the test accuracy of the non-private logistic and ridge baselines::

    PYTHONPATH=. python benchmarks/feature_sets.py --config /work/bench15f/config.yaml

Nothing is computed here: run the workflow first (its targets are the stores and the
baselines' metrics.json). Missing pieces are shown as "–".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline_lib import experiments as xp
from pipeline_lib.features.store import FeatureStore, StoreError


def _store_figures(path: str) -> dict | None:
    try:
        st = FeatureStore(path)
    except StoreError:
        return None
    stats = st.attrs.get("extraction_stats") or {}
    if stats.get("kind") == "combine":
        seconds, images = float(stats["seconds"]), int(stats["rows_written"])
    else:
        seconds = float(stats.get("device_seconds") or 0.0)
        images = int(stats.get("images_extracted") or 0)
    return {"n": st.num_examples, "d": st.feature_dim, "seconds": seconds, "images": images}


def _accuracy(config: dict, run: dict) -> float | None:
    path = Path(xp.run_outputs(config, run)["metrics"])
    if not path.exists():
        return None
    return float(json.loads(path.read_text())["test_accuracy"])


def rows(config: dict) -> list[dict]:
    out = []
    runs = xp.expand_runs(config)
    for name in config["experiments"]:
        mine = [r for r in runs if r["experiment"] == name and not r["private"]]
        if not mine:
            continue
        r0 = mine[0]
        args = (config["results_dir"], r0["dataset"], r0["backbone"], r0["image_size"])
        stores = [_store_figures(xp.feature_path(*args, s)) for s in ("train", "test")]
        row = {"experiment": name, "backbone": r0["backbone"], "image_size": r0["image_size"]}
        if all(stores):
            seconds = sum(s["seconds"] for s in stores)
            images = sum(s["images"] for s in stores)
            row.update(
                n_train=stores[0]["n"],
                n_test=stores[1]["n"],
                d=stores[0]["d"],
                seconds=seconds,
                per_s=images / seconds if seconds > 0 else None,
            )
        for r in mine:
            row[r["method"]] = _accuracy(config, r)
        out.append(row)
    return out


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(table: list[dict]) -> str:
    lines = [
        "| feature set | px | N train / test | d | extraction s (train+test) | img/s "
        "| logistic % | ridge % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        n = f"{r['n_train']} / {r['n_test']}" if "n_train" in r else "–"
        lines.append(
            f"| {r['backbone']} | {r['image_size']} | {n} | {r.get('d', '–')} "
            f"| {_fmt(r.get('seconds'), '.0f')} | {_fmt(r.get('per_s'), '.1f')} "
            f"| {_fmt(_pct(r.get('nonprivate_logistic')), '.2f')} "
            f"| {_fmt(_pct(r.get('nonprivate_ridge')), '.2f')} |"
        )
    return "\n".join(lines)


def _pct(value):
    return None if value is None else 100 * value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the workflow config (config.yaml)")
    args = parser.parse_args()
    config = xp.load_yaml(args.config)
    config["experiments"] = xp.load_experiments(config["experiments_file"])
    print(markdown(rows(config)))


if __name__ == "__main__":
    main()
