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


# --- Sharded feature extraction (issue 4). Pure functions of the config dict. -------------

EXTRACTION_DEFAULTS = {
    "batch_size": 64,
    "chunk_rows": 1024,
    "dtype": "float32",
    "shards": 1,
    "shards_per_dataset": {},
    "prefetch_batches": 2,
    "decode_threads": 1,
    "num_devices": None,
    "log_every_s": 30.0,
}
# The settings that change a store's bytes; a change reruns extraction of finished stores.
EXTRACTION_STORE_KEYS = ("batch_size", "chunk_rows", "dtype")


def extraction_options(config: dict) -> dict:
    """The config's ``extraction`` block with every default applied."""
    given = dict(config.get("extraction") or {})
    unknown = sorted(set(given) - set(EXTRACTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"extraction: unknown key(s) {unknown}; known: {sorted(EXTRACTION_DEFAULTS)}"
        )
    options = {**EXTRACTION_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    options["num_devices"] = given.get("num_devices")
    options["shards_per_dataset"] = dict(options["shards_per_dataset"] or {})
    for key, value in [("shards", options["shards"])] + [
        (f"shards_per_dataset.{k}", v) for k, v in options["shards_per_dataset"].items()
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"extraction.{key}={value!r} must be an integer >= 1")
    return options


def extraction_shards(config: dict, dataset: str) -> int:
    """How many shard jobs fill each store of ``dataset``: the per-dataset override, else
    ``extraction.shards``."""
    options = extraction_options(config)
    return int(options["shards_per_dataset"].get(dataset, options["shards"]))


def extraction_store_settings(config: dict, dataset: str, backbone: str) -> dict:
    """Everything a store's bytes depend on, as rule params: changing any reruns its jobs."""
    options = extraction_options(config)
    return {
        "extraction": {k: options[k] for k in EXTRACTION_STORE_KEYS},
        "dataset": dict((config.get("datasets") or {}).get(dataset) or {}),
        "backbone": (config.get("backbones") or {}).get(backbone),
    }


def backbone_options(config: dict, backbone: str) -> dict:
    """Keyword arguments for ``get_backbone`` beyond name and dtype: ``spec`` (the entry
    ``backbones.<backbone>``) and ``cache_dir`` (``checkpoint_cache_dir``), each only when
    the config has it, so that backbones without them keep working."""
    options = {}
    spec = (config.get("backbones") or {}).get(backbone)
    if spec is not None:
        options["spec"] = spec
    if config.get("checkpoint_cache_dir") is not None:
        options["cache_dir"] = config["checkpoint_cache_dir"]
    return options


def extraction_patterns(config: dict) -> dict[str, str]:
    """Snakemake path patterns of the extraction jobs of one store (wildcards in braces).

    The job files live in the store's work directory (``<store>.inprogress/jobs/``),
    which finalize deletes, so a finished store leaves only itself behind. The shard
    count is part of the shard file names so that changing it mid-way starts new jobs
    (they skip chunks already done) instead of reusing files of another partition.
    """
    store = str(
        Path(
            config["results_dir"],
            "features",
            "{dataset}",
            "{backbone}",
            "{image_size}px",
            "{split}.zarr",
        )
    )
    logs = str(
        Path(config["results_dir"], "logs", "extract", "{dataset}", "{backbone}", "{image_size}px")
    )
    return {
        "store": store,
        "init": str(Path(f"{store}.inprogress", "jobs", "init.json")),
        "shard": str(Path(f"{store}.inprogress", "jobs", "shard-{shard}-of-{num_shards}.json")),
        "init_log": str(Path(logs, "{split}-init.log")),
        "shard_log": str(Path(logs, "{split}-shard-{shard}-of-{num_shards}.log")),
        "finalize_log": str(Path(logs, "{split}-finalize.log")),
    }


def shard_done_paths(
    config: dict, dataset: str, backbone: str, image_size: int | str, split: str
) -> list[str]:
    """The done files of every shard job of one store, in shard order."""
    num_shards = extraction_shards(config, dataset)
    pattern = extraction_patterns(config)["shard"]
    return [
        pattern.format(
            dataset=dataset,
            backbone=backbone,
            image_size=image_size,
            split=split,
            shard=k,
            num_shards=num_shards,
        )
        for k in range(num_shards)
    ]
