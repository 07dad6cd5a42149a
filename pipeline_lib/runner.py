"""One head run: calibrate, (tune,) fit, evaluate, and write head.npz + metrics.json."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import numpy as np

import pipeline_lib
from pipeline_lib import tuning as tn
from pipeline_lib.features.split import RowSubset
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads import STATS_HEADS, make_head
from pipeline_lib.heads.linear import accuracy, num_correct
from pipeline_lib.heads.stats import load_stats
from pipeline_lib.privacy import accounting, noise
from pipeline_lib.privacy.events import event_to_json
from pipeline_lib.run_outputs import write_run_outputs

COVERED = "the released head weights (head.npz), computed from the training split"
COVERED_TUNED = (
    "the released head weights (head.npz) and the noisy validation scores of every "
    "candidate, all computed from the training split"
)


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _fit(head, method: str, data, stats_file: str | None, seed: int) -> dict:
    """Fit on streamed ``data`` or, for statistics heads, on the cached statistics."""
    if method in STATS_HEADS:
        if stats_file is None:
            raise ValueError(f"{method} needs cached statistics, but no stats file was given")
        stats = load_stats(stats_file, data=data)
        if stats.num_examples != data.num_examples:
            raise ValueError(
                f"{stats_file}: computed on {stats.num_examples} examples, but the training "
                f"data has {data.num_examples}; delete the stale statistics file"
            )
        return head.fit(stats, seed=seed)
    return head.fit(data, seed=seed)


def _noise_seed(spec: dict, *extra: object) -> int:
    """A distinct noise seed per run (and per candidate), so no two releases share noise."""
    return noise.run_seed(
        spec["experiment"],
        spec["dataset"],
        spec["backbone"],
        spec["image_size"],
        spec["method"],
        spec["budget"],
        spec["seed"],
        *extra,
    )


def _bounds(head) -> dict:
    return dict(l2_clip_norm=head.l2_clip_norm, transform=head.feature_transform)


def _private_record(head, spec: dict, *, spent: float, event, covered: str, tuning) -> dict:
    delta = float(spec["delta"])
    return dict(
        target_epsilon=float(spec["epsilon"]),
        target_delta=delta,
        spent_epsilon=spent,
        spent_delta=delta,
        accountant=head.accountant,
        neighboring_relation=accounting.NEIGHBORING_RELATION,
        noise_multipliers=head.noise_multipliers(),
        dp_event=str(event),
        dp_event_json=event_to_json(event),
        privacy_statement=accounting.privacy_statement(
            method=spec["method"],
            epsilon=spent,
            delta=delta,
            accountant=head.accountant,
            covered=covered,
            tuning=tuning,
        ),
    )


def _run_untuned(spec, head, train, timings) -> tuple[dict, dict]:
    eps, delta = float(spec["epsilon"]), float(spec["delta"])
    accounting.check_budget(eps, delta, train.num_examples)
    t = time.perf_counter()
    head = tn.calibrate_alone(head, epsilon=eps, delta=delta, num_examples=train.num_examples)
    timings["calibrate"] = time.perf_counter() - t
    event = head.dp_event()
    spent = accounting.epsilon_of(event, delta, head.accountant)
    if spent > eps:
        raise AssertionError(f"spent epsilon {spent} exceeds target {eps}")
    record = _private_record(head, spec, spent=spent, event=event, covered=COVERED, tuning=None)
    record.update(per_run_epsilon=spent, epsilon_covers_tuning=False, tuning=None)
    t = time.perf_counter()
    stats_file = spec["candidates"][0].get("stats_file")
    params = _fit(head, spec["method"], train, stats_file, _noise_seed(spec))
    timings["fit"] = time.perf_counter() - t
    return record, {"params": params, "head": head}


def _run_private_selection(spec, heads, train, timings) -> tuple[dict, dict]:
    eps, delta = float(spec["epsilon"]), float(spec["delta"])
    fraction = float(spec["tuning"]["validation_fraction"])
    t = time.perf_counter()
    fit_part, validation = RowSubset.split(train, fraction=fraction)
    timings["split"] = time.perf_counter() - t
    t = time.perf_counter()
    joint = tn.calibrate_jointly(
        heads,
        epsilon=eps,
        delta=delta,
        accountant=heads[0].accountant,
        num_examples=fit_part.num_examples,
    )
    timings["calibrate"] = time.perf_counter() - t
    if joint.spent_epsilon > eps:
        raise AssertionError(f"tuned run spent {joint.spent_epsilon} > target {eps}")
    t = time.perf_counter()
    fitted, correct = [], []
    for g, (head, cand) in enumerate(zip(joint.heads, spec["candidates"], strict=True)):
        params = _fit(head, spec["method"], fit_part, cand["stats_file"], _noise_seed(spec, g))
        fitted.append(params)
        correct.append(num_correct(validation, params["weights"], params["bias"], **_bounds(head)))
    selected, noisy = tn.noisy_selection(
        correct,
        noise_multiplier=joint.selection_noise_multiplier,
        seed=_noise_seed(spec, "selection"),
    )
    timings["fit"] = time.perf_counter() - t
    n_val = validation.num_examples
    how = (
        f"private selection among {len(heads)} candidates by noisy validation accuracy on a "
        f"held-out {fraction:g} of the training split; all candidate trainings and the "
        "selection are composed"
    )
    record = _private_record(
        joint.heads[selected],
        spec,
        spent=joint.spent_epsilon,
        event=joint.event,
        covered=COVERED_TUNED,
        tuning=how,
    )
    record.update(
        per_run_epsilon=joint.candidate_epsilons[selected],
        epsilon_covers_tuning=True,
        num_train_fit=fit_part.num_examples,
        tuning={
            "selection": "private",
            "validation_fraction": fraction,
            "num_candidates": len(heads),
            "selected": selected,
            "selection_noise_multiplier": joint.selection_noise_multiplier,
            "noise_factor": joint.factor,
            "candidates": [
                {
                    "hyperparameters": h.hyperparameters(),
                    "noise_multipliers": h.noise_multipliers(),
                    "epsilon_alone": e,
                    # released with noise (DP); exact counts are never written
                    "noisy_validation_accuracy": float(s) / n_val,
                }
                for h, e, s in zip(joint.heads, joint.candidate_epsilons, noisy, strict=True)
            ],
        },
    )
    return record, {"params": fitted[selected], "head": joint.heads[selected]}


def _run_public_selection(spec, heads, train, public_train, public_test, timings):
    eps, delta = float(spec["epsilon"]), float(spec["delta"])
    accounting.check_budget(eps, delta, train.num_examples)
    t = time.perf_counter()
    scores = []
    for g, (head, cand) in enumerate(zip(heads, spec["candidates"], strict=True)):
        h = tn.calibrate_alone(
            head, epsilon=eps, delta=delta, num_examples=public_train.num_examples
        )
        seed = _noise_seed(spec, "public", g)
        params = _fit(h, spec["method"], public_train, cand.get("public_stats_file"), seed)
        scores.append(accuracy(public_test, params["weights"], params["bias"], **_bounds(h)))
    selected = int(np.argmax(scores))
    timings["tune_public"] = time.perf_counter() - t
    record, out = _run_untuned(
        dict(
            spec, candidates=[{"stats_file": spec["candidates"][selected].get("final_stats_file")}]
        ),
        heads[selected],
        train,
        timings,
    )
    how = (
        f"selection among {len(heads)} candidates trained and compared on the public "
        f"dataset {spec['tuning']['public_dataset']!r}; the private data paid for one run"
    )
    record["privacy_statement"] = accounting.privacy_statement(
        method=spec["method"],
        epsilon=record["spent_epsilon"],
        delta=float(spec["delta"]),
        accountant=out["head"].accountant,
        covered=COVERED,
        tuning=how,
    )
    record.update(
        epsilon_covers_tuning=True,
        tuning={
            "selection": "public",
            "public_dataset": spec["tuning"]["public_dataset"],
            "num_candidates": len(heads),
            "selected": selected,
            "candidates": [
                {"hyperparameters": h.hyperparameters(), "public_test_accuracy": s}
                for h, s in zip(heads, scores, strict=True)
            ],
        },
    )
    return record, out


def run_head(
    spec: dict,
    *,
    train_store: str | os.PathLike,
    test_store: str | os.PathLike,
    metrics_path: str | os.PathLike,
    head_path: str | os.PathLike,
    public_train_store: str | os.PathLike | None = None,
    public_test_store: str | os.PathLike | None = None,
) -> dict:
    """Run one (experiment, dataset, backbone, method, budget, seed) and write its outputs.

    `spec` is one row of `pipeline_lib.experiments.expand_runs`. head.npz is
    written first and metrics.json last, each by atomic rename, so a run with
    a metrics file is a finished run.
    """
    timings: dict[str, float] = {}
    method = spec["method"]
    where = f"experiment {spec['experiment']!r}, method {method!r}"
    heads = [make_head(method, c["hyperparameters"], where=where) for c in spec["candidates"]]
    train = FeatureStore(train_store)
    test = FeatureStore(test_store)
    if test.feature_dim != train.feature_dim or test.num_classes != train.num_classes:
        raise ValueError(f"{test_store}: feature_dim/num_classes differ from {train_store}")

    record = {
        "experiment": spec["experiment"],
        "method": method,
        "private": bool(heads[0].private),
        "seed": int(spec["seed"]),
        "dataset": spec["dataset"],
        "backbone": spec["backbone"],
        "image_size": int(spec["image_size"]),
        "num_train": train.num_examples,
        "num_test": test.num_examples,
        "feature_dim": train.feature_dim,
        "num_classes": train.num_classes,
        "code_version": pipeline_lib.__version__,
        "jax_backend": jax.default_backend(),
    }
    tuning = spec.get("tuning")
    if not heads[0].private:
        t = time.perf_counter()
        head = heads[0]
        stats_file = spec["candidates"][0].get("stats_file")
        out = {"params": _fit(head, method, train, stats_file, int(spec["seed"])), "head": head}
        timings["fit"] = time.perf_counter() - t
        record.update(
            target_epsilon=None,
            target_delta=None,
            spent_epsilon=None,
            spent_delta=None,
            per_run_epsilon=None,
            epsilon_covers_tuning=None,
            accountant=None,
            neighboring_relation=None,
            noise_multipliers={},
            tuning=None,
            privacy_statement="NON-PRIVATE baseline: no differential privacy guarantee.",
        )
    elif tuning is None or len(heads) == 1:
        private, out = _run_untuned(spec, heads[0], train, timings)
        record.update(private)
    elif tuning["selection"] == "private":
        private, out = _run_private_selection(spec, heads, train, timings)
        record.update(private)
    else:
        if public_train_store is None or public_test_store is None:
            raise ValueError(f"{where}: public selection needs the public dataset's stores")
        pub_train, pub_test = FeatureStore(public_train_store), FeatureStore(public_test_store)
        private, out = _run_public_selection(spec, heads, train, pub_train, pub_test, timings)
        record.update(private)
    head, params = out["head"], out["params"]
    record["hyperparameters"] = head.hyperparameters()

    t = time.perf_counter()
    record["test_accuracy"] = accuracy(test, params["weights"], params["bias"], **_bounds(head))
    # No training-set accuracy: it is a statistic of the private data that the
    # DP guarantee does not cover, so it is never written out.
    timings["evaluate"] = time.perf_counter() - t
    record["timings_s"] = timings

    write_run_outputs(head_path, metrics_path, params, record)  # with checksums
    return record
