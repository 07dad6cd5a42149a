"""The run contract: what one head run is asked to do (`RunSpec`) and what it wrote (`RunRecord`).

A run's spec travels through Snakemake as the plain dict that
`pipeline_lib.experiments.expand_runs` builds (rule ``fit_head``'s ``params: spec``):
Snakemake compares params between invocations, so that dict stays the canonical form
and a change to it would rerun every finished run, a new privacy release. The runner
turns it into a `RunSpec` first thing (`RunSpec.from_dict`), which checks every key
and names the one that is wrong.

`RunRecord` is what the runner writes to metrics.json (a flat JSON object) and, as
metadata, into head.npz; reporting, the privacy ledger and the released-head loader
read it back through `RunRecord.from_json`, which checks it and names the file and key.
Its fields come in two groups (see `RELEASED_FIELDS`, `INTERNAL_FIELDS`):

* **released**: what the privacy statement covers or states as public: the identity
  of the run and its data, the weights' metadata, the hyperparameters, the (ε, δ)
  targets and spend, the accountant, the DpEvent, the noise multipliers, the noisy
  tuning scores, the public quantities, and the test-split evaluation;
* **internal**: how the run was executed, which no release needs: wall times, the
  code version, the JAX backend, the checksums and the metrics file's path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "INTERNAL_FIELDS",
    "RELEASED_FIELDS",
    "Candidate",
    "MetricsError",
    "RunRecord",
    "RunSpec",
    "RunSpecError",
]


class RunSpecError(ValueError):
    """A run spec (a row of `expand_runs`) lacks a key or holds a wrong value."""


class MetricsError(ValueError):
    """A metrics file is unreadable or inconsistent. The message names the file."""


# --- RunSpec -------------------------------------------------------------------------

_MISSING = object()


def _spec_value(spec: Mapping, key: str, where: str, kinds: tuple, *, optional=False):
    value = spec.get(key, _MISSING)
    if value is _MISSING:
        raise RunSpecError(f"{where}: run spec lacks key {key!r}")
    if value is None and optional:
        return None
    wrong_bool = isinstance(value, bool) and bool not in kinds  # True is an int to Python
    if wrong_bool or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds) + (" or null" if optional else "")
        raise RunSpecError(f"{where}: run spec key {key!r} must be {names}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One hyperparameter candidate of a run and the statistics files it reads."""

    hyperparameters: Mapping[str, Any]
    uses_stats: bool
    transform: str
    l2_clip_norm: float
    stats_file: str | None = None
    public_stats_file: str | None = None  # public selection: statistics of the public data
    final_stats_file: str | None = None  # public selection: the private run's statistics

    @classmethod
    def from_dict(cls, cand: Any, where: str) -> Candidate:
        if not isinstance(cand, Mapping):
            raise RunSpecError(f"{where}: must be a mapping, got {cand!r}")
        stats = {
            k: _spec_value(cand, k, where, (str,), optional=True) if k in cand else None
            for k in ("stats_file", "public_stats_file", "final_stats_file")
        }
        return cls(
            hyperparameters=dict(_spec_value(cand, "hyperparameters", where, (Mapping,))),
            uses_stats=_spec_value(cand, "uses_stats", where, (bool,)),
            transform=_spec_value(cand, "transform", where, (str,)),
            l2_clip_norm=float(_spec_value(cand, "l2_clip_norm", where, (int, float))),
            **stats,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One expanded run: an (experiment, dataset, backbone, size, method, budget, seed).

    Built from the canonical dict by `from_dict`; see the module docstring for why the
    dict, not this class, is what Snakemake sees.
    """

    experiment: str
    dataset: str
    backbone: str
    image_size: int
    method: str
    private: bool
    epsilon: float | None  # None for a non-private baseline
    delta: float | None
    accountant: str | None
    budget: str  # "eps<ε:g>" or "nonprivate": the path component
    seed: int
    hyperparameters: Mapping[str, Any]  # the first candidate's
    candidates: tuple[Candidate, ...]
    tuning: Mapping[str, Any] | None  # the experiment's tuning block, when it has a grid
    noise: Mapping[str, Any] | None  # {"mode": "secret"} or {"mode": "reproducible", ...}
    part: str  # "all" or "fit<f>": which statistics part the candidates read
    uses_stats: bool
    transform: str
    l2_clip_norm: float

    IDENTITY = ("experiment", "dataset", "backbone", "image_size", "method", "budget", "seed")

    @classmethod
    def from_dict(cls, spec: Any) -> RunSpec:
        """Check the dict of `expand_runs`/`find_run`; a RunSpecError names the bad key."""
        if isinstance(spec, RunSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise RunSpecError(f"a run spec must be a mapping, got {type(spec).__name__}")
        ident = "/".join(str(spec.get(k, "?")) for k in cls.IDENTITY)
        where = f"run {ident}"

        def get(key, *kinds, optional=False):
            return _spec_value(spec, key, where, kinds, optional=optional)

        private = get("private", bool)
        epsilon = get("epsilon", int, float, optional=True)
        delta = get("delta", int, float, optional=True)
        if private and (epsilon is None or delta is None):
            raise RunSpecError(f"{where}: a private run needs epsilon and delta, got "
                               f"epsilon={epsilon!r}, delta={delta!r}")  # fmt: skip
        candidates = get("candidates", list, tuple)
        if not candidates:
            raise RunSpecError(f"{where}: run spec key 'candidates' is empty")
        tuning = get("tuning", Mapping, optional=True)
        if tuning is not None and "selection" not in tuning:
            raise RunSpecError(f"{where}: run spec key 'tuning' lacks 'selection'")
        return cls(
            experiment=get("experiment", str),
            dataset=get("dataset", str),
            backbone=get("backbone", str),
            image_size=int(get("image_size", int, str)),
            method=get("method", str),
            private=private,
            epsilon=None if epsilon is None else float(epsilon),
            delta=None if delta is None else float(delta),
            accountant=get("accountant", str, optional=True),
            budget=get("budget", str),
            seed=int(get("seed", int)),
            hyperparameters=dict(get("hyperparameters", Mapping)),
            candidates=tuple(
                Candidate.from_dict(c, f"{where}, candidates[{i}]")
                for i, c in enumerate(candidates)
            ),
            tuning=None if tuning is None else dict(tuning),
            noise=get("noise", Mapping, optional=True),
            part=get("part", str),
            uses_stats=get("uses_stats", bool),
            transform=get("transform", str),
            l2_clip_norm=float(get("l2_clip_norm", int, float)),
        )

    @property
    def identity(self) -> tuple:
        """The run's public identity (all of it is in its path and metrics.json)."""
        return tuple(getattr(self, k) for k in self.IDENTITY)

    @property
    def where(self) -> str:
        """How error messages name the run."""
        return f"experiment {self.experiment!r}, method {self.method!r}"


# --- RunRecord -----------------------------------------------------------------------

_RELEASED = {"group": "released"}
_INTERNAL = {"group": "internal"}
# Written only by some runs (omitted from the JSON when None, as the runner always did).
_OPTIONAL = ("public_quantities", "dp_event", "dp_event_json", "num_train_fit",
             "head_sha256", "content_sha256")  # fmt: skip
# What every metrics.json must hold, whatever wrote it.
REQUIRED_KEYS = (
    "experiment",
    "method",
    "private",
    "seed",
    "target_epsilon",
    "target_delta",
    "spent_epsilon",
    "spent_delta",
    "accountant",
    "neighboring_relation",
    "noise_multipliers",
    "test_accuracy",
)
# Keys that a non-private run must leave null: it has no privacy budget to report.
_NULL_WHEN_NONPRIVATE = ("target_epsilon", "target_delta", "spent_epsilon", "accountant")
# Relative slack when comparing spent with target budgets (float round-off only).
BUDGET_RTOL = 1e-9


def _released(default: Any = None) -> Any:
    return dataclasses.field(default=default, metadata=_RELEASED)


def _internal(default: Any = None) -> Any:
    return dataclasses.field(default=default, metadata=_INTERNAL)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RunRecord(Mapping):
    """One finished run, as metrics.json (and head.npz's metadata) hold it.

    Reads also as a read-only mapping of its JSON keys (`to_json`), plus
    ``metrics_path`` when it was loaded from a file, so report code can treat loaded
    runs and plain dicts alike.
    """

    # released: the run and its data (public identity, and what the head was fitted on)
    experiment: str = _released()
    method: str = _released()
    private: bool = _released()
    seed: int = _released()
    dataset: str | None = _released()
    backbone: str | None = _released()
    image_size: int | None = _released()
    num_train: int | None = _released()
    num_test: int | None = _released()
    data_source: str | None = _released()  # files or TFDS name, and split (the ledger's key)
    feature_dim: int | None = _released()
    num_classes: int | None = _released()
    class_names: list | None = _released()
    features: Mapping[str, Any] | None = _released()  # how the features were computed
    # released: the guarantee (null for a non-private baseline)
    differentially_private: bool | None = _released()
    noise: Mapping[str, Any] | None = _released()  # the noise's randomness, never the key
    public_quantities: Mapping[str, Any] | None = _released()
    target_epsilon: float | None = _released()
    target_delta: float | None = _released()
    spent_epsilon: float | None = _released()
    spent_delta: float | None = _released()
    per_run_epsilon: float | None = _released()
    epsilon_covers_tuning: bool | None = _released()
    accountant: str | None = _released()
    neighboring_relation: str | None = _released()
    noise_multipliers: Mapping[str, float] = _released()
    dp_event: str | None = _released()
    dp_event_json: Any = _released()
    privacy_statement: str | None = _released()
    num_train_fit: int | None = _released()
    tuning: Mapping[str, Any] | None = _released()  # incl. noisy candidate scores
    # released: the head and its evaluation (test accuracy is outside the guarantee)
    hyperparameters: Mapping[str, Any] | None = _released()
    test_accuracy: float = _released()
    test_confusion: list | None = _released()
    # internal: how the run executed; no release needs them
    code_version: str | None = _internal()
    jax_backend: str | None = _internal()
    timings_s: Mapping[str, float] | None = _internal()
    head_sha256: str | None = _internal()  # added by run_outputs.write_run_outputs
    content_sha256: str | None = _internal()
    metrics_path: str | None = _internal()  # where it was loaded from; never written

    # -- writing
    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of metrics.json (without ``metrics_path``)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "metrics_path" or (value is None and f.name in _OPTIONAL):
                continue
            out[f.name] = value
        return out

    def released(self) -> dict[str, Any]:
        """Only the released fields (what the privacy statement covers or states public)."""
        return {k: v for k, v in self.to_json().items() if k in RELEASED_FIELDS}

    # -- the read-only mapping view
    def _view(self) -> dict[str, Any]:
        view = self.to_json()
        if self.metrics_path is not None:
            view["metrics_path"] = self.metrics_path
        return view

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._view())

    # -- reading
    @classmethod
    def from_json(cls, run: Any, path: str, *, metrics_path: str | None = None) -> RunRecord:
        """Check a parsed metrics.json (or head metadata) from ``path``; a MetricsError
        names the file and the key. A private run whose spent ε or δ exceeds its target is
        refused: reporting it at its target would overstate its privacy."""

        def fail(problem: str) -> MetricsError:
            return MetricsError(f"{path}: {problem}")

        if not isinstance(run, Mapping):
            raise fail(f"expected a JSON object, got {type(run).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in run]
        if missing:
            raise fail(f"missing required keys: {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(run) - known)
        if unknown:
            raise fail(
                f"unknown key(s) {', '.join(map(repr, unknown))}: not written by this "
                "version's runner; known keys: see pipeline_lib.run_contract.RunRecord"
            )
        for key in ("experiment", "method"):
            if not isinstance(run[key], str) or not run[key]:
                raise fail(f"{key} must be a non-empty string, got {run[key]!r}")
        if not isinstance(run["private"], bool):
            raise fail(f"private must be true or false, got {run['private']!r}")
        if not isinstance(run["seed"], int) or isinstance(run["seed"], bool):
            raise fail(f"seed must be an integer, got {run['seed']!r}")
        accuracy = run["test_accuracy"]
        if not _is_number(accuracy) or not 0.0 <= accuracy <= 1.0:
            raise fail(f"test_accuracy must be a fraction in [0, 1], got {accuracy!r}")
        multipliers = run["noise_multipliers"]
        if not isinstance(multipliers, Mapping):
            raise fail(f"noise_multipliers must be an object, got {multipliers!r}")
        for key in ("noise", "tuning", "hyperparameters", "timings_s", "public_quantities",
                    "features"):  # fmt: skip
            if run.get(key) is not None and not isinstance(run[key], Mapping):
                raise fail(f"{key} must be an object or null, got {run[key]!r}")
        if run["private"]:
            _check_private(run, fail)
        else:
            set_keys = [key for key in _NULL_WHEN_NONPRIVATE if run[key] is not None]
            if set_keys or multipliers:
                raise fail(
                    "private is false, but the run carries privacy parameters "
                    f"({', '.join(set_keys + (['noise_multipliers'] if multipliers else []))}); "
                    "a non-private run must leave them null/empty so it is never read as DP"
                )
        return cls(**{**run, "metrics_path": metrics_path})


def _check_private(run: Mapping, fail) -> None:
    target_epsilon, target_delta = run["target_epsilon"], run["target_delta"]
    spent_epsilon, spent_delta = run["spent_epsilon"], run["spent_delta"]
    if not _is_number(target_epsilon) or target_epsilon <= 0:
        raise fail(f"target_epsilon must be a number > 0 for a private run, got {target_epsilon!r}")
    if not _is_number(target_delta) or not 0 < target_delta < 1:
        raise fail(f"target_delta must be in (0, 1) for a private run, got {target_delta!r}")
    if not _is_number(spent_epsilon) or spent_epsilon < 0:
        raise fail(f"spent_epsilon must be a number >= 0 for a private run, got {spent_epsilon!r}")
    if not _is_number(spent_delta) or not 0 <= spent_delta < 1:
        raise fail(f"spent_delta must be in [0, 1) for a private run, got {spent_delta!r}")
    if spent_epsilon > target_epsilon * (1 + BUDGET_RTOL):
        raise fail(
            f"spent_epsilon {spent_epsilon!r} exceeds target_epsilon {target_epsilon!r}; "
            "reporting this run at its target would overstate its privacy"
        )
    if spent_delta > target_delta * (1 + BUDGET_RTOL):
        raise fail(
            f"spent_delta {spent_delta!r} exceeds target_delta {target_delta!r}; "
            "reporting this run at its target would overstate its privacy"
        )
    for key in ("accountant", "neighboring_relation"):
        if not isinstance(run[key], str) or not run[key]:
            raise fail(f"{key} must be a non-empty string for a private run, got {run[key]!r}")
    multipliers = run["noise_multipliers"]
    if not multipliers:
        raise fail("noise_multipliers is empty for a private run")
    for name, value in multipliers.items():
        if not _is_number(value) or value <= 0:
            raise fail(f"noise_multipliers[{name!r}] must be a number > 0, got {value!r}")


RELEASED_FIELDS = tuple(
    f.name for f in dataclasses.fields(RunRecord) if f.metadata["group"] == "released"
)
INTERNAL_FIELDS = tuple(
    f.name for f in dataclasses.fields(RunRecord) if f.metadata["group"] == "internal"
)
