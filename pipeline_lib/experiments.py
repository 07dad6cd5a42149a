"""Expand the config into a table of runs; all defaults are applied here.

The Snakemake rules only ask this module for paths and run specs, so the
logic that decides what runs is reachable from pytest.

Paths (under ``results_dir``)::

    features/{dataset}/{backbone}/{image_size}px/{split}.zarr
    stats/{dataset}/{backbone}/{image_size}px/{transform}-C{clip}.npz
    runs/{experiment}/{method}/{budget}/seed{seed}/{metrics.json,head.npz}
    reports/{experiment}/{summary.csv,summary.md,accuracy_vs_epsilon.png}

``budget`` is ``eps{epsilon:g}`` for private methods and ``nonprivate`` for
baselines.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.heads import HEADS, STATS_HEADS, make_head
from pipeline_lib.privacy.accounting import ACCOUNTANTS, check_budget

SPLITS = ("train", "test")


class ConfigError(ValueError):
    """The config is invalid; the message names the experiment, key and value."""


def budget_name(epsilon: float | None) -> str:
    return "nonprivate" if epsilon is None else f"eps{epsilon:g}"


def feature_path(results_dir, dataset, backbone, image_size, split) -> str:
    return str(Path(results_dir, "features", dataset, backbone, f"{image_size}px", f"{split}.zarr"))


def stats_path(results_dir, dataset, backbone, image_size, transform, clip) -> str:
    return str(
        Path(
            results_dir, "stats", dataset, backbone, f"{image_size}px", f"{transform}-C{clip:g}.npz"
        )
    )


def run_dir(results_dir, experiment, method, budget, seed) -> str:
    return str(Path(results_dir, "runs", experiment, method, budget, f"seed{seed}"))


def report_dir(results_dir, experiment) -> str:
    return str(Path(results_dir, "reports", experiment))


def _require(exp: dict, key: str, name: str):
    if key not in exp:
        raise ConfigError(f"experiment {name!r}: missing required key {key!r}")
    return exp[key]


def expand_runs(config: dict) -> list[dict]:
    """Every head run the config asks for, as plain dicts (one per metrics.json)."""
    experiments = config.get("experiments")
    if not isinstance(experiments, dict) or not experiments:
        raise ConfigError(
            "config key 'experiments' must be a non-empty mapping of named experiments"
        )
    datasets = config.get("datasets", {})
    runs = []
    for name, exp in experiments.items():
        where = f"experiment {name!r}"
        dataset = _require(exp, "dataset", name)
        if dataset not in datasets:
            raise ConfigError(
                f"{where}: dataset {dataset!r} is not defined under 'datasets' in config.yaml "
                f"(defined: {sorted(datasets)})"
            )
        image_size = int(_require(exp, "image_size", name))
        if image_size < 16:
            raise ConfigError(f"{where}: image_size={image_size} must be >= 16")
        delta = float(_require(exp, "delta", name))
        epsilons = [float(e) for e in _require(exp, "epsilons", name)]
        seeds = [int(s) for s in _require(exp, "seeds", name)]
        accountant = exp.get("accountant", "pld")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"{where}: accountant={accountant!r}; allowed: {list(ACCOUNTANTS)}")
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds={seeds} must be a non-empty list of distinct ints")
        for eps in epsilons:
            try:
                check_budget(eps, delta)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        if len(set(budget_name(e) for e in epsilons)) != len(epsilons):
            raise ConfigError(f"{where}: epsilons={epsilons} has duplicates")
        common = {
            "experiment": name,
            "dataset": dataset,
            "backbone": _require(exp, "backbone", name),
            "image_size": image_size,
        }
        methods = exp.get("methods") or {}
        baselines = exp.get("baselines") or {}
        if not methods and not baselines:
            raise ConfigError(f"{where}: needs at least one entry under 'methods' or 'baselines'")
        for group, entries, private in (
            ("methods", methods, True),
            ("baselines", baselines, False),
        ):
            for method, params in entries.items():
                mwhere = f"{where}, {group}.{method}"
                if method not in HEADS:
                    raise ConfigError(f"{mwhere}: unknown method; known: {sorted(HEADS)}")
                if HEADS[method].private != private:
                    kind = "private" if HEADS[method].private else "non-private"
                    raise ConfigError(f"{mwhere}: {method} is {kind}; list it under the other key")
                params = dict(params or {})
                if private:
                    params.setdefault("accountant", accountant)
                try:
                    head = make_head(method, params, where=mwhere)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
                hyper = head.hyperparameters()
                budgets = epsilons if private else [None]
                for eps in budgets:
                    for seed in seeds if private else seeds[:1]:
                        runs.append(
                            dict(
                                common,
                                method=method,
                                private=private,
                                epsilon=eps,
                                delta=delta if private else None,
                                budget=budget_name(eps),
                                seed=seed,
                                hyperparameters=hyper,
                                uses_stats=method in STATS_HEADS,
                                transform=head.feature_transform,
                                l2_clip_norm=head.l2_clip_norm,
                            )
                        )
    return runs


def run_outputs(config: dict, run: dict) -> dict[str, str]:
    d = run_dir(config["results_dir"], run["experiment"], run["method"], run["budget"], run["seed"])
    return {"metrics": str(Path(d, "metrics.json")), "head": str(Path(d, "head.npz"))}


def run_inputs(config: dict, run: dict) -> dict[str, str]:
    r = config["results_dir"]
    args = (r, run["dataset"], run["backbone"], run["image_size"])
    out = {"train": feature_path(*args, "train"), "test": feature_path(*args, "test")}
    if run["uses_stats"]:
        out["stats"] = stats_path(*args, run["transform"], run["l2_clip_norm"])
    return out


def find_run(config: dict, experiment: str, method: str, budget: str, seed: str | int) -> dict:
    for run in expand_runs(config):
        if (run["experiment"], run["method"], run["budget"], str(run["seed"])) == (
            experiment,
            method,
            budget,
            str(seed),
        ):
            return run
    raise ConfigError(f"no run {experiment}/{method}/{budget}/seed{seed} in the config")


def experiment_metrics(config: dict, experiment: str) -> list[str]:
    return [
        run_outputs(config, r)["metrics"]
        for r in expand_runs(config)
        if r["experiment"] == experiment
    ]


def all_reports(config: dict) -> list[str]:
    return [
        str(Path(report_dir(config["results_dir"], name), "accuracy_vs_epsilon.png"))
        for name in config["experiments"]
    ]


def dataset_options(config: dict, dataset: str, split: str) -> dict:
    """Keyword arguments for `pipeline_lib.data.load_dataset` for one split."""
    if dataset not in config.get("datasets", {}):
        raise ConfigError(f"dataset {dataset!r} is not defined under 'datasets'")
    spec = config["datasets"][dataset]
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} unknown; use one of {SPLITS}")
    limit = spec.get(f"max_{split}_examples")
    return {
        "name": spec.get("source", dataset),
        "split": split,
        "data_dir": spec.get("data_dir"),
        "allow_network": bool(spec.get("allow_network", False)),
        "max_examples": None if limit is None else int(limit),
    }
