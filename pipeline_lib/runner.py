"""One head run: calibrate, fit, evaluate, and write head.npz + metrics.json."""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

import pipeline_lib
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads import STATS_HEADS, make_head
from pipeline_lib.heads.linear import accuracy
from pipeline_lib.heads.stats import load_stats
from pipeline_lib.privacy import accounting

COVERED = "the released head weights (head.npz), computed from the training split"


def _wants_num_examples(head) -> bool:
    return "num_examples" in inspect.signature(head.calibrate).parameters


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run_head(
    spec: dict,
    *,
    train_store: str | os.PathLike,
    test_store: str | os.PathLike,
    stats_path: str | os.PathLike | None,
    metrics_path: str | os.PathLike,
    head_path: str | os.PathLike,
) -> dict:
    """Run one (experiment, method, budget, seed) and write its outputs.

    `spec` is one row of `pipeline_lib.experiments.expand_runs`. head.npz is
    written first and metrics.json last, each by atomic rename, so a run with
    a metrics file is a finished run.
    """
    timings = {}
    where = f"experiment {spec['experiment']!r}, method {spec['method']!r}"
    head = make_head(spec["method"], spec["hyperparameters"], where=where)
    train = FeatureStore(train_store)
    test = FeatureStore(test_store)
    if test.feature_dim != train.feature_dim or test.num_classes != train.num_classes:
        raise ValueError(f"{test_store}: feature_dim/num_classes differ from {train_store}")

    record = {
        "experiment": spec["experiment"],
        "method": spec["method"],
        "private": bool(head.private),
        "seed": int(spec["seed"]),
        "dataset": spec["dataset"],
        "backbone": spec["backbone"],
        "image_size": int(spec["image_size"]),
        "num_train": train.num_examples,
        "num_test": test.num_examples,
        "feature_dim": train.feature_dim,
        "num_classes": train.num_classes,
        "hyperparameters": head.hyperparameters(),
        "code_version": pipeline_lib.__version__,
        "jax_backend": jax.default_backend(),
    }
    if head.private:
        eps, delta = float(spec["epsilon"]), float(spec["delta"])
        accounting.check_budget(eps, delta, train.num_examples)
        t = time.perf_counter()
        # N is data-dependent, so it is a call-time argument, never a config field; only
        # heads whose sampling rate depends on it (Poisson-sampled SGD) ask for it.
        extra = {"num_examples": train.num_examples} if _wants_num_examples(head) else {}
        head = head.calibrate(epsilon=eps, delta=delta, **extra)
        timings["calibrate"] = time.perf_counter() - t
        spent = accounting.epsilon_of(head.dp_event(), delta, head.accountant)
        if spent > eps:
            raise AssertionError(f"{where}: spent epsilon {spent} exceeds target {eps}")
        record.update(
            target_epsilon=eps,
            target_delta=delta,
            spent_epsilon=spent,
            spent_delta=delta,
            accountant=head.accountant,
            neighboring_relation=accounting.NEIGHBORING_RELATION,
            noise_multipliers=head.noise_multipliers(),
            dp_event=str(head.dp_event()),
            privacy_statement=accounting.privacy_statement(
                method=spec["method"],
                epsilon=spent,
                delta=delta,
                accountant=head.accountant,
                covered=COVERED,
            ),
        )
    else:
        record.update(
            target_epsilon=None,
            target_delta=None,
            spent_epsilon=None,
            spent_delta=None,
            accountant=None,
            neighboring_relation=None,
            noise_multipliers={},
            privacy_statement="NON-PRIVATE baseline: no differential privacy guarantee.",
        )

    t = time.perf_counter()
    if spec["method"] in STATS_HEADS:
        stats = load_stats(stats_path)
        if stats.num_examples != train.num_examples:
            raise ValueError(
                f"{stats_path}: computed on {stats.num_examples} examples, "
                f"store {train_store} has {train.num_examples}"
            )
        params = head.fit(stats, seed=int(spec["seed"]))
    else:
        params = head.fit(train, seed=int(spec["seed"]))
    timings["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    kw = dict(l2_clip_norm=head.l2_clip_norm, transform=head.feature_transform)
    record["test_accuracy"] = accuracy(test, params["weights"], params["bias"], **kw)
    # No training-set accuracy: it is a statistic of the private data that the
    # DP guarantee does not cover, so it is never written out.
    timings["evaluate"] = time.perf_counter() - t
    record["timings_s"] = timings

    metadata = json.dumps(record, sort_keys=True)
    metrics_path, head_path = Path(metrics_path), Path(head_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)

    def write_head(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, weights=params["weights"], bias=params["bias"], metadata=np.array(metadata))

    _atomic_write_bytes(head_path, write_head)
    _atomic_write_bytes(metrics_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return record
