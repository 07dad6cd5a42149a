"""Expand the config into a table of runs; all defaults are applied here.

The Snakemake rules only ask this module for paths and run specs, so the
logic that decides what runs is reachable from pytest, and cluster jobs see
exactly the values the tests check.

Paths (under ``results_dir``)::

    features/{dataset}/{backbone}/{image_size}px/{split}.zarr
    stats/{dataset}/{backbone}/{image_size}px/{transform}-C{clip}-{part}.npz
    runs/{experiment}/{dataset}/{backbone}/{image_size}px/{method}/{budget}/seed{seed}/
        metrics.json, head.npz
    reports/{experiment}/summary.csv, summary.md, runs.csv, accuracy_vs_epsilon.png,
        per_class.csv, confusion.png
    reports/index.md, ledger.csv, ledger.md, all_experiments.png

The Snakemake rules take these as patterns from `extraction_patterns` and
`run_patterns`, and every concrete path here fills in the same patterns.

``budget`` is ``eps{epsilon:g}`` for private methods and ``nonprivate`` for
baselines; ``part`` is ``all`` (the whole training split) or ``fit{f:g}``
(the training split minus a validation part of fraction f, for private
hyperparameter selection; see ``pipeline_lib.features.split``).

Hyperparameter grids: a list as a method's hyperparameter value is a grid;
the candidates are the Cartesian product. A method with more than one
candidate needs the experiment's ``tuning`` block, which says how one is
selected and so what the reported epsilon covers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline_lib.heads import HEADS, STATS_HEADS, make_head
from pipeline_lib.privacy.accounting import ACCOUNTANTS, check_budget
from pipeline_lib.privacy.selection import trials_shape

SPLITS = ("train", "test")
# The JSON schemas of the experiments file and the config: package data (pyproject.toml),
# found through importlib.resources wherever the package is installed.
SCHEMA_NAME = "experiments.schema.yaml"
CONFIG_SCHEMA_NAME = "config.schema.yaml"
# Experiment, dataset and backbone names become folder names under results/.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
# What PyYAML 1.1 reads as a string although it looks like a number: 1e-5, 5E+3, 1.e-5 ...
_FLOAT_LIKE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MAX_CANDIDATES = 64
SELECTIONS = ("private", "public", "repeat_and_select")
HOLDOUT_SELECTIONS = ("private", "repeat_and_select")  # both hold out a validation part
EXPERIMENT_DEFAULTS = {
    "accountant": "pld",
    "methods": {},
    "baselines": {},
    "tuning": None,
    "noise": {"mode": "secret"},
}
TUNING_DEFAULTS = {"validation_fraction": 0.1, "public_dataset": None}
RS_KEYS = ("mean_trials", "trials_law", "trials_shape")


class ConfigError(ValueError):
    """The config is invalid; the message names the experiment, key and value."""


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects duplicate mapping keys (PyYAML keeps the last)."""


def _construct_mapping(loader, node, deep=False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"{node.start_mark.name}: duplicate key {key!r} at line "
                f"{key_node.start_mark.line + 1} (first at line {seen[key] + 1}); "
                "every experiment, method and option must be named once"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file, rejecting duplicate keys; errors name the file."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _path_of(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def float_spelling_hint(value: Any) -> str:
    """A hint when ``value`` (or an item of a list) is a string that YAML 1.1 did not read
    as the float it spells."""
    if isinstance(value, list):
        return next((h for h in map(float_spelling_hint, value) if h), "")
    if isinstance(value, str) and _FLOAT_LIKE.fullmatch(value.strip()):
        mantissa, _, exponent = value.strip().lower().partition("e")
        mantissa = (
            mantissa
            if "." in mantissa and not mantissa.endswith(".")
            else (mantissa.rstrip(".") + ".0")
        )
        sign = "" if exponent[0] in "+-" else "+"
        return (
            f"; YAML reads {value} as a string, not a number: write {mantissa}e{sign}{exponent} "
            "(a dot in the mantissa and a signed exponent)"
        )
    return ""


def check_name(kind: str, name: Any, source: str) -> None:
    """Names become folder names: letters, digits, '_', '.', '-' only."""
    if not isinstance(name, str):
        raise ConfigError(
            f"{source}: {kind} name {name!r} is read by YAML as a {type(name).__name__}, not "
            f'a name; quote it ("{name}") or start it with a letter'
        )
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{source}: {kind} name {name!r} is not allowed; it becomes a folder name under "
            "results/, so use only letters, digits, '_', '.' and '-' "
            f"(e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', str(name)).strip('.') or 'my_name'!r})"
        )


def _format_errors(errors: list, source: str) -> str:
    messages = []
    for error in errors[:5]:
        path = list(error.absolute_path)
        where = f"{source}: " + (
            f"experiment {path[1]!r}, key {'.'.join(map(str, path[2:])) or '(entry)'}"
            if len(path) >= 2 and path[0] == "experiments"
            else f"key {_path_of(error)}"
        )
        allowed = error.schema.get("description") if isinstance(error.schema, dict) else None
        if error.validator == "additionalProperties":
            known = sorted(error.schema.get("properties", {}))
            msg = f"{where}: {error.message}; allowed keys: {known}"
        elif error.validator == "enum" and "propertyNames" in list(error.relative_schema_path)[-2:]:
            msg = (
                f"{where}: {error.instance!r} is not an option here; the options are "
                f"{error.validator_value}"
            )
            if error.instance == "allow_network":
                msg += " (this source never uses the network, so it has no allow_network)"
        else:
            msg = f"{where}: value {error.instance!r} is invalid: {error.message}"
            if allowed:
                msg += f" (expected: {allowed})"
            msg += float_spelling_hint(error.instance)
        messages.append(msg)
    more = f"\n... and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "\n".join(messages) + more


def schema_path(name: str = SCHEMA_NAME) -> str:
    """A file path of one of the package's schemas (for Snakemake's ``validate``)."""
    return str(importlib.resources.files("pipeline_lib").joinpath("schemas", name))


def load_schema(name: str = SCHEMA_NAME) -> dict:
    """The parsed schema ``pipeline_lib/schemas/<name>``."""
    resource = importlib.resources.files("pipeline_lib").joinpath("schemas", name)
    return yaml.safe_load(resource.read_text(encoding="utf-8"))


def _schema_errors(doc: Any, schema_name: str) -> list:
    import jsonschema

    schema = load_schema(schema_name)
    validator = jsonschema.Draft202012Validator(schema)
    return sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))


def validate_experiments(doc: Any, *, source: str = "experiments file") -> None:
    """Check ``doc`` (the parsed experiments file) against the JSON schema.

    The error names the experiment, the key path and the bad value, and says
    what is allowed (from the schema's own description), with a hint for numbers
    that YAML read as strings (``1e-5``) and for names that cannot be folder names.
    """
    if isinstance(doc, dict) and isinstance(doc.get("experiments"), dict):
        for name in doc["experiments"]:
            check_name("experiment", name, source)
    errors = _schema_errors(doc, SCHEMA_NAME)
    if errors:
        raise ConfigError(_format_errors(errors, source))


def validate_config(config: dict, *, source: str = "config") -> None:
    """Check the workflow config (config/config.yaml) against its schema, with hints.

    Snakemake's own ``validate`` runs after this one (it fills in defaults); this one
    runs first so that mistakes get messages for people: the key, the value, the fix.
    """
    for kind, key in (("dataset", "datasets"), ("backbone", "backbones")):
        for name in (config.get(key) or {}) if isinstance(config.get(key), dict) else ():
            check_name(kind, name, f"{source}: {key}")
    errors = _schema_errors({k: v for k, v in config.items() if k != "experiments"},
                            CONFIG_SCHEMA_NAME)  # fmt: skip
    if errors:
        raise ConfigError(_format_errors(errors, source))


def load_experiments(path: str | os.PathLike) -> dict:
    """The validated ``experiments`` mapping of an experiments file."""
    doc = load_yaml(path)
    if not isinstance(doc, dict) or "experiments" not in doc:
        raise ConfigError(f"{path}: must be a mapping with a top-level key 'experiments'")
    validate_experiments(doc, source=str(path))
    return doc["experiments"]


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively.

    Snakemake compares rule params by their text, so a config whose keys were merely
    reordered (e.g. rewritten by a YAML dumper) must not look like a change that reruns
    finished jobs.
    """
    return json.loads(json.dumps(value, sort_keys=True))


# ----------------------------------------------------------------------------- paths


def budget_name(epsilon: float | None) -> str:
    return "nonprivate" if epsilon is None else f"eps{epsilon:g}"


def part_name(validation_fraction: float | None) -> str:
    return "all" if validation_fraction is None else f"fit{validation_fraction:g}"


def feature_path(results_dir, dataset, backbone, image_size, split) -> str:
    pattern = extraction_patterns({"results_dir": results_dir})["store"]
    return pattern.format(dataset=dataset, backbone=backbone, image_size=image_size, split=split)


def stats_path(results_dir, dataset, backbone, image_size, transform, clip, part="all") -> str:
    return run_patterns({"results_dir": results_dir})["stats"].format(
        dataset=dataset,
        backbone=backbone,
        image_size=image_size,
        transform=transform,
        clip=f"{clip:g}",
        part=part,
    )


# The wildcards of a head run (its path) and the files of each report.
RUN_WILDCARDS = ("experiment", "dataset", "backbone", "image_size", "method", "budget", "seed")
REPORT_FILES = {
    "csv": "summary.csv",
    "md": "summary.md",
    "runs": "runs.csv",
    "png": "accuracy_vs_epsilon.png",
    "per_class": "per_class.csv",
    "confusion": "confusion.png",
}
INDEX_FILES = {
    "index": "index.md",
    "ledger_csv": "ledger.csv",
    "ledger_md": "ledger.md",
    "png": "all_experiments.png",
}


def run_patterns(config: dict) -> dict[str, str]:
    """Snakemake path patterns of stage 2 and the reports (wildcards in braces).

    The one source of these paths: heads.smk and report.smk take their inputs, outputs
    and logs from here, and the concrete paths below (`stats_path`, `run_outputs`,
    `report_files`, `index_files`) fill in the same patterns. Keys: ``train_store``,
    ``stats``, ``stats_log``, ``metrics``, ``head``, ``fit_log``, ``report_<kind>`` for
    each kind of `REPORT_FILES`, ``report_log``, ``index_<kind>`` for each kind of
    `INDEX_FILES`, and ``index_log``.
    """
    r = config["results_dir"]
    setting = ("{dataset}", "{backbone}", "{image_size}px")
    stats = Path(*setting, "{transform}-C{clip}-{part}")
    run = Path("{experiment}", *setting, "{method}", "{budget}", "seed{seed}")
    patterns = {
        "train_store": extraction_patterns(config)["store"].replace("{split}", "train"),
        "stats": str(Path(r, "stats", f"{stats}.npz")),
        "stats_log": str(Path(r, "logs", "compute_stats", f"{stats}.log")),
        "metrics": str(Path(r, "runs", run, "metrics.json")),
        "head": str(Path(r, "runs", run, "head.npz")),
        "fit_log": str(Path(r, "logs", "fit_head", f"{run}.log")),
        "report_log": str(Path(r, "logs", "report_experiment", "{experiment}.log")),
        "index_log": str(Path(r, "logs", "report_index.log")),
    }
    for kind, name in REPORT_FILES.items():
        patterns[f"report_{kind}"] = str(Path(r, "reports", "{experiment}", name))
    for kind, name in INDEX_FILES.items():
        patterns[f"index_{kind}"] = str(Path(r, "reports", name))
    return patterns


# ----------------------------------------------------------------------------- expansion


def _as_list(value, key: str, where: str) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}: '{key}' is an empty list; give at least one value")
    if len(set(map(str, values))) != len(values):
        raise ConfigError(f"{where}: '{key}'={values} has duplicates")
    return values


def _candidates(params: dict | None, where: str) -> list[dict]:
    """The Cartesian product of the list-valued hyperparameters (grids)."""
    params = dict(params or {})
    keys = sorted(params)
    grids = []
    for key in keys:
        value = params[key]
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{where}.{key}: empty grid []; give at least one value")
            if len(set(map(json.dumps, value))) != len(value):
                raise ConfigError(f"{where}.{key}: grid {value} has duplicate values")
            grids.append(value)
        else:
            grids.append([value])
    combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grids)]
    if len(combos) > MAX_CANDIDATES:
        raise ConfigError(
            f"{where}: the grid has {len(combos)} candidates; at most {MAX_CANDIDATES} "
            "(each private candidate costs privacy budget)"
        )
    return combos


def _known_backbones(config: dict) -> list[str]:
    from pipeline_lib.backbones import list_backbones

    return sorted(set(list_backbones()) | set(config.get("backbones") or {}))


def _check_data_path(config: dict, dataset: str) -> None:
    """Missing local data is an error now, not after hours of queueing (hints per source)."""
    from pipeline_lib.data.dataset import DatasetUnavailableError
    from pipeline_lib.data.preflight import check_available

    try:
        check_available(dataset, config["datasets"][dataset] or {})
    except DatasetUnavailableError as exc:
        raise ConfigError(str(exc)) from exc


@functools.lru_cache(maxsize=32)
def _cheap_num_train(dataset: str, spec_json: str) -> int | None:
    from pipeline_lib.data.preflight import cheap_num_train

    return cheap_num_train(dataset, json.loads(spec_json))


def _known_num_train(config: dict, dataset: str) -> int | None:
    """N of the training split when it is cheap to know: ``max_train_examples``, IDX
    headers, TFDS's dataset_info.json or a folder listing (``pipeline_lib.data.preflight``)."""
    spec = config["datasets"][dataset] or {}
    try:
        return _cheap_num_train(dataset, json.dumps(spec, sort_keys=True, default=str))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from exc


def _check_checkpoint(config: dict, backbone: str) -> None:
    """A backbone whose checkpoint is neither on disk nor allowed to be downloaded is an
    error when the run is planned (the hint to allow the network only for remote files)."""
    from pipeline_lib.backbones import checkpoint_path, handcrafted_sha256, list_backbones
    from pipeline_lib.backbones.checkpoints import (
        DEFAULT_CACHE_DIR,
        CheckpointError,
        cache_path,
        resolve_url,
    )

    if (combination := combination_spec(config, backbone)) is not None:
        for source in combination["sources"]:  # a combination needs its sources' checkpoints
            _check_checkpoint(config, source["backbone"])
        return
    spec = (config.get("backbones") or {}).get(backbone)
    where = f"backbones.{backbone}"
    if spec is None or spec.get("model") != "vit":
        builtin = backbone if spec is None else f"efficientnet_{spec.get('variant')}"
        if builtin in list_backbones() and handcrafted_sha256(builtin) is None:
            try:
                checkpoint_path(builtin)
            except Exception as exc:  # noqa: BLE001 - MissingWeightsError names the package
                raise ConfigError(f"backbone {backbone!r}: {exc}") from exc
        return
    uri = str(spec.get("checkpoint"))
    try:
        url = resolve_url(uri)
    except CheckpointError as exc:
        raise ConfigError(f"{where}.checkpoint: {exc}") from exc
    if url is None:
        local = uri[len("file://") :] if uri.lower().startswith("file://") else uri
        path = Path(os.path.expanduser(local)).absolute()
        if not path.is_file():
            raise ConfigError(
                f"{where}.checkpoint: file {path} does not exist (from {uri!r}); fix the path "
                "in config.yaml (a local file is used in place and never downloaded)"
            )
        return
    cache_dir = config.get("checkpoint_cache_dir") or DEFAULT_CACHE_DIR
    cached = cache_path(url, cache_dir)
    if not os.path.isfile(cached) and not spec.get("allow_network"):
        raise ConfigError(
            f"{where}.checkpoint: {uri} is not in the checkpoint cache ({cached}) and "
            f"{where}.allow_network is off. Set {where}.allow_network: true to download it "
            f"once, or download {url} yourself to that path, or point checkpoint at a local file"
        )


def _delta_suggestion(num_examples: int) -> str:
    """A round delta well below 1/N, spelled so that YAML reads it as a number."""
    exponent = -int(np.ceil(np.log10(num_examples))) - 1
    return f"1.0e{exponent}"


def _tuning(exp: dict, where: str, datasets: dict) -> dict | None:
    tuning = exp.get("tuning")
    if tuning is None:
        return None
    tuning = {**TUNING_DEFAULTS, **tuning}
    selection = tuning.get("selection")
    if selection not in SELECTIONS:
        raise ConfigError(f"{where}: tuning.selection={selection!r}; allowed: {list(SELECTIONS)}")
    fraction = float(tuning["validation_fraction"])
    if not 0.0 < fraction < 0.5:
        raise ConfigError(f"{where}: tuning.validation_fraction={fraction} must be in (0, 0.5)")
    tuning["validation_fraction"] = fraction
    public = tuning.get("public_dataset")
    if selection == "public":
        if public is None:
            raise ConfigError(
                f"{where}: tuning.selection='public' needs tuning.public_dataset, a dataset "
                "key whose data is public (candidates are trained and compared on it)"
            )
        if public not in datasets:
            raise ConfigError(
                f"{where}: tuning.public_dataset={public!r} is not defined under 'datasets' "
                f"(defined: {sorted(datasets)})"
            )
        if public == exp.get("dataset") or public in (exp.get("datasets") or []):
            raise ConfigError(
                f"{where}: tuning.public_dataset={public!r} is the private dataset itself; "
                "use selection: private to tune on the private data with the cost accounted"
            )
    elif public is not None:
        raise ConfigError(f"{where}: tuning.public_dataset is only used with selection: public")
    if selection == "repeat_and_select":
        tuning.setdefault("trials_law", "geometric")
        try:
            trials_shape(tuning["trials_law"], tuning.get("trials_shape"))
        except ValueError as exc:
            raise ConfigError(f"{where}: tuning: {exc}") from exc
    else:
        for key in RS_KEYS:
            if tuning.get(key) is not None:
                raise ConfigError(
                    f"{where}: tuning.{key} is only used with selection: repeat_and_select"
                )
    return tuning


def _noise(exp: dict, where: str) -> dict:
    """The experiment's noise setting, normalised: {mode: secret} or {mode: reproducible, seed}."""
    cfg = exp.get("noise") or {}
    mode = cfg.get("mode", "secret")
    if mode == "secret":
        if "seed" in cfg:
            raise ConfigError(
                f"{where}: noise.seed is only used with noise.mode 'reproducible'; in mode "
                "'secret' the key comes from the OS's randomness (remove noise.seed)"
            )
        return {"mode": "secret"}
    if mode == "reproducible":
        return {"mode": "reproducible", "seed": int(cfg.get("seed", 0))}
    raise ConfigError(f"{where}: noise.mode={mode!r}; allowed: ['secret', 'reproducible']")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One experiment after validation: everything its runs are made of."""

    name: str
    datasets: list[str]
    backbones: list[str]
    image_size: int
    delta: float
    epsilons: list[float]
    seeds: list[int]
    accountant: str
    tuning: dict | None
    noise: dict
    methods: list[tuple[str, bool, list]]  # (method, private, candidate heads)


def _validate(config: dict, name: str, exp_in: Any) -> _Plan:
    """Check one experiment's keys against each other and the config; apply defaults."""
    datasets = config.get("datasets") or {}
    where = f"experiment {name!r}"
    check_name("experiment", name, "experiments")
    if not isinstance(exp_in, dict):
        raise ConfigError(f"{where}: must be a mapping of keys, got {exp_in!r}")
    exp = {**EXPERIMENT_DEFAULTS, **exp_in}
    for key in ("image_size", "epsilons", "delta", "seeds"):
        if key not in exp:
            raise ConfigError(f"{where}: missing required key {key!r}")
    if ("dataset" in exp) == ("datasets" in exp):
        raise ConfigError(f"{where}: give exactly one of 'dataset' or 'datasets'")
    if ("backbone" in exp) == ("backbones" in exp):
        raise ConfigError(f"{where}: give exactly one of 'backbone' or 'backbones'")
    exp_datasets = _as_list(exp.get("dataset", exp.get("datasets")), "datasets", where)
    exp_backbones = _as_list(exp.get("backbone", exp.get("backbones")), "backbones", where)
    for dataset in exp_datasets:
        if dataset not in datasets:
            raise ConfigError(
                f"{where}: dataset {dataset!r} is not defined under 'datasets' in config.yaml "
                f"(defined: {sorted(datasets)})"
            )
        _check_data_path(config, dataset)
    backbones_known = _known_backbones(config)
    for backbone in exp_backbones:
        if backbone not in backbones_known:
            raise ConfigError(
                f"{where}: backbone {backbone!r} is unknown; built in or defined under "
                f"'backbones' in config.yaml: {backbones_known}"
            )
        _check_checkpoint(config, backbone)
    image_size = int(exp["image_size"])
    if image_size < 16:
        raise ConfigError(f"{where}: image_size={image_size} must be >= 16")
    delta = float(exp["delta"])
    epsilons = [float(e) for e in _as_list(exp["epsilons"], "epsilons", where)]
    seeds = [int(s) for s in _as_list(exp["seeds"], "seeds", where)]
    accountant = exp["accountant"]
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"{where}: accountant={accountant!r}; allowed: {list(ACCOUNTANTS)}")
    _check_budgets(config, where, exp_datasets, epsilons, delta)
    tuning = _tuning(exp, where, datasets)
    return _Plan(
        name=name,
        datasets=exp_datasets,
        backbones=exp_backbones,
        image_size=image_size,
        delta=delta,
        epsilons=epsilons,
        seeds=seeds,
        accountant=accountant,
        tuning=tuning,
        noise=_noise(exp, where),
        methods=_methods(exp, where, accountant, tuning),
    )


def _check_budgets(config, where, datasets, epsilons, delta) -> None:
    for eps in epsilons:
        try:
            check_budget(eps, delta)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    for dataset in datasets:
        n = _known_num_train(config, dataset)
        if n is not None:
            try:
                check_budget(epsilons[0], delta, int(n))
            except ValueError as exc:
                raise ConfigError(
                    f"{where}, key delta, dataset {dataset!r}: {exc}; lower delta "
                    f"(e.g. delta: {_delta_suggestion(int(n))}) or use more examples"
                ) from exc
    if len(set(budget_name(e) for e in epsilons)) != len(epsilons):
        raise ConfigError(f"{where}: epsilons={epsilons} has duplicates")


def _methods(exp: dict, where: str, accountant: str, tuning) -> list[tuple[str, bool, list]]:
    """(method, private, candidate heads) for every method and baseline of the experiment."""
    methods, baselines = exp["methods"] or {}, exp["baselines"] or {}
    if not methods and not baselines:
        raise ConfigError(f"{where}: needs at least one entry under 'methods' or 'baselines'")
    rows = []
    for group, entries, private in (("methods", methods, True), ("baselines", baselines, False)):
        for method, params in entries.items():
            mwhere = f"{where}, {group}.{method}"
            if method not in HEADS:
                raise ConfigError(f"{mwhere}: unknown method; known: {sorted(HEADS)}")
            if HEADS[method].private != private:
                kind = "private" if HEADS[method].private else "non-private"
                raise ConfigError(f"{mwhere}: {method} is {kind}; list it under the other key")
            candidates = []
            for cand in _candidates(params, mwhere):
                if private:
                    cand.setdefault("accountant", accountant)
                try:
                    candidates.append(make_head(method, cand, where=mwhere))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
            if not private and len(candidates) > 1:
                raise ConfigError(
                    f"{mwhere}: baselines take single values, not grids (a best-of-grid "
                    "non-private number would be a tuned number presented as a reference)"
                )
            if private and len(candidates) > 1 and tuning is None:
                raise ConfigError(
                    f"{mwhere}: has a grid of {len(candidates)} candidates but the experiment "
                    "has no 'tuning' block; add tuning: {selection: private} (cost "
                    "accounted) or {selection: public, public_dataset: <key>}"
                )
            rows.append((method, private, candidates))
    return rows


def _candidate_rows(config, plan: _Plan, dataset, backbone, method, heads, tuning) -> list[dict]:
    """Each candidate's hyperparameters and the statistics files it reads."""
    fraction = (
        tuning["validation_fraction"]
        if tuning and tuning["selection"] in HOLDOUT_SELECTIONS
        else None
    )
    r = config.get("results_dir", "results")
    cands = []
    for h in heads:
        # A centred head (center: true) computes its centred statistics in its own run.
        uses = method in STATS_HEADS and not getattr(h, "center", False)
        cand = {
            "hyperparameters": h.hyperparameters(),
            "uses_stats": uses,
            "transform": h.feature_transform,
            "l2_clip_norm": h.l2_clip_norm,
        }
        size_args = (r, dataset, backbone, plan.image_size, cand["transform"])
        clip = cand["l2_clip_norm"]
        cand["stats_file"] = stats_path(*size_args, clip, part_name(fraction)) if uses else None
        if tuning and tuning["selection"] == "public":
            pub = (r, tuning["public_dataset"], *size_args[2:])
            cand["public_stats_file"] = stats_path(*pub, clip, "all") if uses else None
            cand["final_stats_file"] = stats_path(*size_args, clip, "all") if uses else None
        cands.append(cand)
    return cands


def _rows(config: dict, plan: _Plan) -> list[dict]:
    """One run dict per (dataset, backbone, method, epsilon, seed) of a validated plan."""
    runs = []
    for dataset, backbone in itertools.product(plan.datasets, plan.backbones):
        for method, private, heads in plan.methods:
            tuning = plan.tuning if private and len(heads) > 1 else None
            cands = _candidate_rows(config, plan, dataset, backbone, method, heads, tuning)
            fraction = (
                tuning["validation_fraction"]
                if tuning and tuning["selection"] in HOLDOUT_SELECTIONS
                else None
            )
            for eps in plan.epsilons if private else [None]:
                for seed in plan.seeds if private else plan.seeds[:1]:
                    runs.append(
                        dict(
                            experiment=plan.name,
                            dataset=dataset,
                            backbone=backbone,
                            image_size=plan.image_size,
                            method=method,
                            private=private,
                            epsilon=eps,
                            delta=plan.delta if private else None,
                            accountant=plan.accountant if private else None,
                            budget=budget_name(eps),
                            seed=seed,
                            hyperparameters=cands[0]["hyperparameters"],
                            candidates=cands,
                            tuning=copy.deepcopy(tuning),
                            noise=dict(plan.noise) if private else None,
                            part=part_name(fraction),
                            uses_stats=any(c["uses_stats"] for c in cands),
                            transform=cands[0]["transform"],
                            l2_clip_norm=cands[0]["l2_clip_norm"],
                        )
                    )
    return runs


def _expand_uncached(config: dict) -> list[dict]:
    """Validate every experiment, then build its runs."""
    experiments = config.get("experiments")
    if not isinstance(experiments, dict) or not experiments:
        raise ConfigError(
            "config key 'experiments' must be a non-empty mapping of named experiments"
        )
    plans = [_validate(config, name, exp) for name, exp in experiments.items()]
    return [run for plan in plans for run in _rows(config, plan)]


@functools.lru_cache(maxsize=8)
def _expand_cached(key: str) -> tuple[dict, ...]:
    return tuple(_canonical_runs(_expand_uncached(json.loads(key))))


def expand_runs(config: dict) -> list[dict]:
    """Every head run the config asks for, as plain dicts (one per metrics.json).

    Memoised on the config's content: Snakemake asks for one run per job.
    """
    keys = ("results_dir", "datasets", "backbones", "experiments")
    try:
        key = json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str)
    except TypeError:
        return _canonical_runs(_expand_uncached(config))
    return [copy.deepcopy(r) for r in _expand_cached(key)]


def _canonical_runs(runs: list[dict]) -> list[dict]:
    return [canonical(r) for r in runs]


# ----------------------------------------------------------------------------- rule helpers


def run_outputs(config: dict, run: dict) -> dict[str, str]:
    """metrics.json and head.npz of one run (a row of `expand_runs`)."""
    patterns = run_patterns(config)
    wildcards = {k: run[k] for k in RUN_WILDCARDS}
    return {k: patterns[k].format(**wildcards) for k in ("metrics", "head")}


def run_inputs(config: dict, run: dict) -> dict[str, Any]:
    """Named inputs of a head run: feature stores and the cached statistics it reads."""
    r = config["results_dir"]
    args = (r, run["dataset"], run["backbone"], run["image_size"])
    out: dict[str, Any] = {
        "train": feature_path(*args, "train"),
        "test": feature_path(*args, "test"),
    }
    keys = ("stats_file", "public_stats_file", "final_stats_file")
    stats = sorted({c[k] for c in run["candidates"] for k in keys if c.get(k)})
    if stats:
        out["stats"] = stats
    tuning = run.get("tuning")
    if tuning and tuning["selection"] == "public":
        pub = (r, tuning["public_dataset"], run["backbone"], run["image_size"])
        out["public_train"] = feature_path(*pub, "train")
        out["public_test"] = feature_path(*pub, "test")
    return out


def find_run(
    config: dict,
    experiment: str,
    dataset: str,
    backbone: str,
    image_size: str | int,
    method: str,
    budget: str,
    seed: str | int,
) -> dict:
    wanted = (experiment, dataset, backbone, str(image_size), method, budget, str(seed))
    for run in expand_runs(config):
        key = (
            run["experiment"],
            run["dataset"],
            run["backbone"],
            str(run["image_size"]),
            run["method"],
            run["budget"],
            str(run["seed"]),
        )
        if key == wanted:
            return run
    raise ConfigError(f"no run {'/'.join(wanted)} in the config")


def experiment_metrics(config: dict, experiment: str) -> list[str]:
    return [
        run_outputs(config, r)["metrics"]
        for r in expand_runs(config)
        if r["experiment"] == experiment
    ]


def all_metrics(config: dict) -> list[str]:
    return [run_outputs(config, r)["metrics"] for r in expand_runs(config)]


def report_files(config: dict, experiment: str) -> dict[str, str]:
    """The outputs of rule report_experiment for ``experiment``, by kind."""
    patterns = run_patterns(config)
    return {k: patterns[f"report_{k}"].format(experiment=experiment) for k in REPORT_FILES}


def index_files(config: dict) -> dict[str, str]:
    """The outputs of rule report_index, by kind."""
    patterns = run_patterns(config)
    return {k: patterns[f"index_{k}"] for k in INDEX_FILES}


def all_reports(config: dict) -> list[str]:
    out = [report_files(config, name)["png"] for name in config["experiments"]]
    return out + list(index_files(config).values())


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
    return canonical(
        {
            "extraction": {k: options[k] for k in EXTRACTION_STORE_KEYS},
            "dataset": dict((config.get("datasets") or {}).get(dataset) or {}),
            "backbone": (config.get("backbones") or {}).get(backbone),
        }
    )


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


# ----------------------------------------------------------------------------- combinations
# A backbone entry with ``model: combine`` names a derived store that concatenates the
# stores of its ``sources`` row by row (pipeline_lib.features.combine). Its stores live at
# the usual path, features/{dataset}/{name}/{image_size}px/{split}.zarr, where
# {image_size} is the experiment's: the size of every source that sets no image_size.
# Rule combine_store builds them; finalize_store never matches a combination's name.

COMBINE_KEYS = ("model", "sources", "source_normalization")


def combination_spec(config: dict, backbone: str) -> dict | None:
    """The entry ``backbones.<backbone>`` if it is a combination (defaults applied), else None.

    Checks every source: a known backbone that is not itself a combination, with an
    optional integer image_size >= 16, none listed twice.
    """
    spec = (config.get("backbones") or {}).get(backbone)
    if not isinstance(spec, dict) or spec.get("model") != "combine":
        return None
    from pipeline_lib.features.combine import SOURCE_NORMALIZATIONS

    where = f"backbones.{backbone}"
    if extra := sorted(set(spec) - set(COMBINE_KEYS)):
        raise ConfigError(f"{where}: unknown key(s) {extra} for model 'combine'; allowed: "
                          f"{list(COMBINE_KEYS)}")  # fmt: skip
    how = spec.get("source_normalization", "none")
    if how not in SOURCE_NORMALIZATIONS:
        raise ConfigError(
            f"{where}.source_normalization is {how!r}; choose one of {list(SOURCE_NORMALIZATIONS)}"
        )
    sources = spec.get("sources")
    if not isinstance(sources, list) or len(sources) < 2:
        raise ConfigError(
            f"{where}.sources must list at least two stores, e.g. [{{backbone: "
            f"efficientnet_lite0}}, {{backbone: scatternet, image_size: 28}}], got {sources!r}"
        )
    known = _known_backbones(config)
    out = []
    for i, src in enumerate(sources):
        at = f"{where}.sources[{i}]"
        if (
            not isinstance(src, dict)
            or "backbone" not in src
            or set(src) - {"backbone", "image_size"}
        ):
            raise ConfigError(
                f"{at}: {src!r} must be a mapping with 'backbone' and an optional 'image_size'"
            )
        name, size = src["backbone"], src.get("image_size")
        if name not in known:
            raise ConfigError(f"{at}.backbone {name!r} is unknown; known backbones: {known}")
        if combination_spec(config, name) is not None:
            raise ConfigError(f"{at}.backbone {name!r} is itself a combination; list its "
                              "sources here instead")  # fmt: skip
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 16):
            raise ConfigError(f"{at}.image_size={size!r} must be an integer >= 16")
        out.append({"backbone": name, "image_size": size})
    seen = [(s["backbone"], s["image_size"]) for s in out]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"{where}.sources lists the same store twice: {seen}")
    return {"model": "combine", "sources": out, "source_normalization": how}


def combined_backbones(config: dict) -> list[str]:
    """The names of the combinations declared under ``backbones``."""
    return sorted(b for b in (config.get("backbones") or {}) if combination_spec(config, b))


def combination_sources(config: dict, backbone: str, image_size: int | str) -> list[dict]:
    """[{backbone, image_size}] of the sources of combination ``backbone`` at ``image_size``."""
    spec = combination_spec(config, backbone)
    if spec is None:
        raise ConfigError(f"backbone {backbone!r} is not a combination (model: combine)")
    return [
        {"backbone": s["backbone"], "image_size": int(s["image_size"] or image_size)}
        for s in spec["sources"]
    ]


def combination_source_paths(
    config: dict, dataset: str, backbone: str, image_size: int | str, split: str
) -> list[str]:
    """The source stores of one combined store, in concatenation order."""
    return [
        feature_path(config["results_dir"], dataset, s["backbone"], s["image_size"], split)
        for s in combination_sources(config, backbone, image_size)
    ]


def combination_settings(config: dict, dataset: str, backbone: str, image_size) -> dict:
    """Everything a combined store's bytes depend on (rule params): the sources with their
    own store settings, the normalisation and chunk_rows."""
    spec = combination_spec(config, backbone)
    return canonical(
        {
            "sources": [
                dict(s, settings=extraction_store_settings(config, dataset, s["backbone"]))
                for s in combination_sources(config, backbone, image_size)
            ],
            "source_normalization": spec["source_normalization"],
            "chunk_rows": extraction_options(config)["chunk_rows"],
        }
    )


def backbone_wildcard(config: dict, *, combined: bool) -> str:
    """Regex for the {backbone} wildcard of rule combine_store (``combined``) or of the
    extraction rules (not ``combined``): the two never claim the same store."""
    names = "|".join(re.escape(b) for b in combined_backbones(config))
    if combined:
        return f"(?:{names})" if names else "(?!)"  # (?!) matches nothing
    # the name is followed by '/' in a path (and by the end in a bare name)
    return f"(?!(?:{names})(?:/|$))[^/]+" if names else "[^/]+"


def combine_patterns(config: dict) -> dict[str, str]:
    """Path patterns of rule combine_store (the store pattern is extraction's)."""
    logs = Path(config["results_dir"], "logs", "combine", "{dataset}", "{backbone}",
                "{image_size}px")  # fmt: skip
    return {"store": extraction_patterns(config)["store"], "log": str(Path(logs, "{split}.log"))}
