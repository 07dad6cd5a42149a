"""One head run: build the mechanism for (spec, N), fit, evaluate, and write.

`run_head` is the whole of it: the spec dict becomes a checked `RunSpec`; the
mechanism (`_mechanism`) is chosen from the spec (non-private, one candidate, or one of
the three hyperparameter selections) and returns a `Release`; the test split is
evaluated; one builder (`_record`) turns spec, data and release into the `RunRecord`
that `run_outputs.write_run_outputs` writes as head.npz and metrics.json.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

import pipeline_lib
from pipeline_lib.features.split import RowSubset
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads import STATS_HEADS, make_head
from pipeline_lib.heads.linear import accuracy, confusion_matrix, num_correct
from pipeline_lib.heads.released import feature_provenance
from pipeline_lib.heads.stats import load_stats
from pipeline_lib.privacy import accounting, noise
from pipeline_lib.privacy import selection as tn
from pipeline_lib.privacy.events import event_to_json
from pipeline_lib.run_contract import RunRecord, RunSpec
from pipeline_lib.run_outputs import write_run_outputs

COVERED = "the released head weights (head.npz), computed from the training split"
NONPRIVATE_STATEMENT = (
    "NON-PRIVATE baseline: no differential privacy guarantee. It is computed from the same "
    "private training split as the DP runs, and publishing its accuracy is outside every "
    "guarantee this project states."
)
COVERED_TUNED = (
    "the released head weights (head.npz) and the noisy validation scores of every "
    "candidate, all computed from the training split"
)
COVERED_RS = (
    "the released head weights (head.npz), its hyperparameters and its noisy validation "
    "score: the best of a random number of trials, each a random candidate; the number of "
    "trials, the other trials and their scores are never released"
)


def _fit(head, method: str, data, stats_file: str | None, **fit_kw) -> dict:
    """Fit on streamed ``data`` or, for statistics heads, on the cached statistics.

    ``fit_kw`` is ``key=<NoiseKey>`` for a private head, ``seed=<int>`` for a baseline.
    """
    if method in STATS_HEADS:
        if stats_file is None:
            raise ValueError(f"{method} needs cached statistics, but no stats file was given")
        stats = load_stats(stats_file, data=data)
        if stats.num_examples != data.num_examples:
            raise ValueError(
                f"{stats_file}: computed on {stats.num_examples} examples, but the training "
                f"data has {data.num_examples}; delete the stale statistics file"
            )
        return head.fit(stats, **fit_kw)
    return head.fit(data, **fit_kw)


def _field(spec: RunSpec | Mapping, key: str) -> Any:
    return getattr(spec, key) if isinstance(spec, RunSpec) else spec[key]


def run_identity(spec: RunSpec | Mapping) -> tuple:
    """The run's public identity (all of it is in its path and metrics.json)."""
    return tuple(_field(spec, k) for k in RunSpec.IDENTITY)


def _noise_config(spec: RunSpec | Mapping) -> Mapping | None:
    return spec.noise if isinstance(spec, RunSpec) else spec.get("noise")


def noise_key(spec: RunSpec | Mapping) -> noise.NoiseKey:
    """The run's base noise key: fresh OS randomness unless the experiment asks for
    ``noise: {mode: reproducible}`` (tests only; its outputs say they are not private).

    Called once per job: a rerun of the same run is a new release with new noise.
    """
    return noise.key_for_run(_noise_config(spec), run_identity(spec))


def noise_record(spec: RunSpec | Mapping) -> dict:
    """What metrics.json says about the noise's randomness (never the key itself)."""
    cfg = dict(_noise_config(spec) or {"mode": "secret"})
    if cfg.get("mode", "secret") == "secret":
        return {
            "mode": "secret",
            "base_key": "64 bits from the OS's cryptographic randomness, drawn when the job "
            "ran and never written anywhere; a rerun draws new noise (a new release)",
        }
    return {
        "mode": "reproducible",
        "seed": int(cfg.get("seed", 0)),
        "notice": noise.NOT_PRIVATE_NOTICE,
    }


def _bounds(head) -> dict:
    return dict(l2_clip_norm=head.l2_clip_norm, transform=head.feature_transform)


def _public_quantities(head, *, num_train: int, num_fit: int | None = None, num_val=None):
    """Data-dependent sizes the guarantee treats as public (stated in the metrics)."""
    n = num_fit if num_fit is not None else num_train
    q = None
    if getattr(head, "num_examples", None) is not None and hasattr(head, "sampling_prob"):
        q = float(head.sampling_prob(head.num_examples))
        q = None if q >= 1.0 else q
    return {
        "num_train": int(num_train),
        "num_train_fit": int(n) if num_fit is not None else None,
        "num_validation": int(num_val) if num_val is not None else None,
        "sampling_prob": q,
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Release:
    """What a mechanism released: the head and its parameters, and, for a private run,
    what the record states about the guarantee (None throughout for a baseline)."""

    head: Any
    params: dict
    spent_epsilon: float | None = None
    event: Any = None  # the composed dp_accounting.DpEvent of everything released
    accountant: str | None = None
    covered: str = COVERED
    how_tuned: str | None = None  # the privacy statement's words on the selection
    public: dict | None = None  # `_public_quantities`
    per_run_epsilon: float | None = None
    epsilon_covers_tuning: bool | None = None
    num_train_fit: int | None = None
    tuning: dict | None = None


Mechanism = Callable[..., Release]  # (train, timings, key) -> Release


def _calibrate(head, *, epsilon: float, delta: float, num_examples: int):
    return head.calibrate(epsilon=epsilon, delta=delta, num_examples=num_examples)


def _fit_nonprivate(spec: RunSpec, head, train, timings, key=None) -> Release:
    t = time.perf_counter()
    params = _fit(head, spec.method, train, spec.candidates[0].stats_file, seed=spec.seed)
    timings["fit"] = time.perf_counter() - t
    return Release(head=head, params=params)


def _fit_untuned(
    spec: RunSpec, head, train, timings, key: noise.NoiseKey, *, stats_file, calibrate
) -> Release:
    eps, delta = spec.epsilon, spec.delta
    t = time.perf_counter()
    head = calibrate(head, epsilon=eps, delta=delta, num_examples=train.num_examples)
    timings["calibrate"] = time.perf_counter() - t
    event = head.dp_event()
    spent = accounting.spend(event, target_epsilon=eps, delta=delta, accountant=head.accountant)
    t = time.perf_counter()
    params = _fit(head, spec.method, train, stats_file, key=key)
    timings["fit"] = time.perf_counter() - t
    return Release(
        head=head,
        params=params,
        spent_epsilon=spent,
        event=event,
        accountant=head.accountant,
        public=_public_quantities(head, num_train=train.num_examples),
        per_run_epsilon=spent,
        epsilon_covers_tuning=False,
    )


def _fit_private_selection(spec: RunSpec, heads, train, timings, key: noise.NoiseKey) -> Release:
    eps, delta = spec.epsilon, spec.delta
    fraction = float(spec.tuning["validation_fraction"])
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
    t = time.perf_counter()
    fitted, correct = [], []
    for g, (head, cand) in enumerate(zip(joint.heads, spec.candidates, strict=True)):
        params = _fit(head, spec.method, fit_part, cand.stats_file, key=key.child("cand", g))
        fitted.append(params)
        correct.append(num_correct(validation, params["weights"], params["bias"], **_bounds(head)))
    selected, noisy = tn.noisy_selection(
        correct,
        noise_multiplier=joint.selection_noise_multiplier,
        key=key.child("selection"),
    )
    timings["fit"] = time.perf_counter() - t
    n_val = validation.num_examples
    winner = joint.heads[selected]
    return Release(
        head=winner,
        params=fitted[selected],
        spent_epsilon=joint.spent_epsilon,
        event=joint.event,
        accountant=winner.accountant,
        covered=COVERED_TUNED,
        how_tuned=(
            f"private selection among {len(heads)} candidates by noisy validation accuracy "
            f"on a held-out {fraction:g} of the training split; all candidate trainings and "
            "the selection are composed"
        ),
        public=_public_quantities(
            winner, num_train=train.num_examples, num_fit=fit_part.num_examples, num_val=n_val
        ),
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


def _fit_repeat_and_select(spec: RunSpec, heads, train, timings, key: noise.NoiseKey) -> Release:
    """Papernot & Steinke's repeat-and-select (see `privacy.selection`).

    Released: the winning trial's weights, hyperparameters and noisy score. Not
    released, and not written anywhere: the number of trials K, which candidates ran,
    the losers' scores and the fit time (which would reveal K).
    """
    eps, delta = spec.epsilon, spec.delta
    tuning = spec.tuning
    fraction = float(tuning["validation_fraction"])
    fit_part, validation = RowSubset.split(train, fraction=fraction)
    mean = float(tuning.get("mean_trials") or max(2, len(heads)))
    shape = tn.trials_shape(tuning.get("trials_law", "geometric"), tuning.get("trials_shape"))
    t = time.perf_counter()
    rs = tn.calibrate_repeat_and_select(
        heads, epsilon=eps, delta=delta, num_examples=fit_part.num_examples, mean=mean, shape=shape
    )
    timings["calibrate"] = time.perf_counter() - t
    picks = tn.draw_candidates(key, tn.draw_trials(key, mean=mean, shape=shape), len(heads))
    best = None
    for i, g in enumerate(picks):
        trial = key.child("trial", i)
        cand = spec.candidates[g]
        params = _fit(rs.heads[g], spec.method, fit_part, cand.stats_file, key=trial)
        correct = num_correct(validation, params["weights"], params["bias"], **_bounds(heads[g]))
        score = tn.noisy_score(correct, noise_multiplier=rs.score_noise_multiplier, key=trial)
        if best is None or score > best[0]:
            best = (score, int(g), params)
    if best is None:  # Poisson law, K = 0: the mechanism outputs "nothing" (accounted)
        d, k = train.feature_dim, train.num_classes
        best = (None, 0, {"weights": np.zeros((d, k), np.float32), "bias": np.zeros(k, np.float32)})
    score, selected, params = best
    law = tuning.get("trials_law", "geometric")
    winner = rs.heads[selected]
    return Release(
        head=winner,
        params=params,
        spent_epsilon=rs.spent_epsilon,
        event=rs.event,
        accountant="rdp",
        covered=COVERED_RS,
        how_tuned=(
            f"repeat-and-select (Papernot & Steinke 2022) over {len(heads)} candidates: a "
            f"random number of trials ({law}, mean {mean:g}), each a random candidate scored "
            f"by noisy validation accuracy on a held-out {fraction:g} of the training split; "
            "only the best trial is released"
        ),
        public=_public_quantities(
            winner,
            num_train=train.num_examples,
            num_fit=fit_part.num_examples,
            num_val=validation.num_examples,
        ),
        per_run_epsilon=rs.trial_epsilon,
        epsilon_covers_tuning=True,
        num_train_fit=fit_part.num_examples,
        tuning={
            "selection": "repeat_and_select",
            "validation_fraction": fraction,
            "num_candidates": len(heads),
            "mean_trials": mean,
            "trials_law": law,
            "trials_shape": shape if math.isfinite(shape) else None,
            "selected": selected if score is not None else None,
            "score_noise_multiplier": rs.score_noise_multiplier,
            "noise_factor": rs.factor,
            # the winner's noisy score only (DP); K and the other trials are never written
            "noisy_validation_accuracy": (
                None if score is None else float(score) / validation.num_examples
            ),
            "candidates": [{"hyperparameters": h.hyperparameters()} for h in rs.heads],
        },
    )


def _fit_public_selection(
    spec: RunSpec, heads, train, timings, key, *, public_train, public_test, calibrate
) -> Release:
    eps, delta = spec.epsilon, spec.delta
    t = time.perf_counter()
    scores = []
    for g, (head, cand) in enumerate(zip(heads, spec.candidates, strict=True)):
        h = head.calibrate(epsilon=eps, delta=delta, num_examples=public_train.num_examples)
        params = _fit(h, spec.method, public_train, cand.public_stats_file, key=key.child("pub", g))
        scores.append(accuracy(public_test, params["weights"], params["bias"], **_bounds(h)))
    selected = int(np.argmax(scores))
    timings["tune_public"] = time.perf_counter() - t
    final = _fit_untuned(
        spec,
        heads[selected],
        train,
        timings,
        key,
        stats_file=spec.candidates[selected].final_stats_file,
        calibrate=calibrate,
    )
    public_dataset = spec.tuning["public_dataset"]
    return dataclasses.replace(
        final,
        how_tuned=(
            f"selection among {len(heads)} candidates trained and compared on the public "
            f"dataset {public_dataset!r}; the private data paid for one run"
        ),
        epsilon_covers_tuning=True,
        tuning={
            "selection": "public",
            "public_dataset": public_dataset,
            "num_candidates": len(heads),
            "selected": selected,
            "candidates": [
                {"hyperparameters": h.hyperparameters(), "public_test_accuracy": s}
                for h, s in zip(heads, scores, strict=True)
            ],
        },
    )


def _mechanism(
    spec: RunSpec, heads: list, *, open_store, calibrate, public_train_store, public_test_store
) -> Mechanism:
    """The release mechanism of this run, as a function of (train, timings, key)."""
    if not spec.private:
        return functools.partial(_fit_nonprivate, spec, heads[0])
    if spec.tuning is None or len(heads) == 1:
        stats_file = spec.candidates[0].stats_file
        return functools.partial(
            _fit_untuned, spec, heads[0], stats_file=stats_file, calibrate=calibrate
        )
    selection = spec.tuning["selection"]
    if selection == "private":
        return functools.partial(_fit_private_selection, spec, heads)
    if selection == "repeat_and_select":
        return functools.partial(_fit_repeat_and_select, spec, heads)
    if selection != "public":
        raise ValueError(f"{spec.where}: unknown tuning selection {selection!r}")
    if public_train_store is None or public_test_store is None:
        raise ValueError(f"{spec.where}: public selection needs the public dataset's stores")
    return functools.partial(
        _fit_public_selection,
        spec,
        heads,
        public_train=open_store(public_train_store),
        public_test=open_store(public_test_store),
        calibrate=calibrate,
    )


def _privacy_fields(spec: RunSpec, release: Release) -> dict:
    """The record's statement of the guarantee: one builder for every private mechanism."""
    if not spec.private:
        return dict(
            differentially_private=False,
            noise=None,
            noise_multipliers={},
            privacy_statement=NONPRIVATE_STATEMENT,
        )
    noise_info = noise_record(spec)
    reproducible = noise_info["mode"] == "reproducible"
    return dict(
        differentially_private=not reproducible,
        noise=noise_info,
        public_quantities=release.public,
        target_epsilon=spec.epsilon,
        target_delta=spec.delta,
        spent_epsilon=release.spent_epsilon,
        spent_delta=spec.delta,
        per_run_epsilon=release.per_run_epsilon,
        epsilon_covers_tuning=release.epsilon_covers_tuning,
        accountant=release.accountant,
        neighboring_relation=accounting.NEIGHBORING_RELATION,
        noise_multipliers=release.head.noise_multipliers(),
        dp_event=str(release.event),
        dp_event_json=event_to_json(release.event),
        privacy_statement=accounting.privacy_statement(
            method=spec.method,
            epsilon=release.spent_epsilon,
            delta=spec.delta,
            accountant=release.accountant,
            covered=release.covered,
            tuning=release.how_tuned,
            public=release.public,
            reproducible=reproducible,
        ),
        num_train_fit=release.num_train_fit,
        tuning=release.tuning,
    )


def _record(spec: RunSpec, train, test, release: Release, confusion, timings) -> RunRecord:
    return RunRecord(
        experiment=spec.experiment,
        method=spec.method,
        private=bool(release.head.private),
        seed=spec.seed,
        dataset=spec.dataset,
        backbone=spec.backbone,
        image_size=spec.image_size,
        num_train=train.num_examples,
        num_test=test.num_examples,
        # the underlying data (files or TFDS name, and split): the ledger composes every
        # release that read the same data, whatever the dataset key or subset size
        data_source=f"{train.attrs.get('source', spec.dataset)} [{train.attrs.get('split')}]",
        feature_dim=train.feature_dim,
        num_classes=train.num_classes,
        **feature_provenance(train),  # class names, backbone, checkpoint, preprocessing
        **_privacy_fields(spec, release),
        hyperparameters=release.head.hyperparameters(),
        test_accuracy=float(np.trace(confusion)) / test.num_examples,
        # Test-split evaluation (not covered by the guarantee, like the accuracy): rows are
        # true labels, columns predictions; the reports draw it for the best seed.
        test_confusion=confusion.tolist(),
        # No training-set accuracy: it is a statistic of the private data that the
        # DP guarantee does not cover, so it is never written out.
        code_version=pipeline_lib.__version__,
        jax_backend=jax.default_backend(),
        timings_s=timings,
    )


def run_head(
    spec: Mapping | RunSpec,
    *,
    train_store: str | os.PathLike,
    test_store: str | os.PathLike,
    metrics_path: str | os.PathLike,
    head_path: str | os.PathLike,
    public_train_store: str | os.PathLike | None = None,
    public_test_store: str | os.PathLike | None = None,
    open_store=FeatureStore,
    calibrate=_calibrate,
) -> dict:
    """Run one (experiment, dataset, backbone, method, budget, seed) and write its outputs.

    `spec` is one row of `pipeline_lib.experiments.expand_runs` (checked here as a
    `RunSpec`). head.npz is written first and metrics.json last, each by atomic rename,
    so a run with a metrics file is a finished run. ``open_store`` and ``calibrate`` let
    a warm process (`pipeline_lib.sweep`) reuse verified stores and public calibrations;
    the noise key is drawn here for every private call, whatever they are. Returns the
    record as written to metrics.json (before its checksums).
    """
    spec = RunSpec.from_dict(spec)
    heads = [make_head(spec.method, c.hyperparameters, where=spec.where) for c in spec.candidates]
    train = open_store(train_store)
    test = open_store(test_store)
    if test.feature_dim != train.feature_dim or test.num_classes != train.num_classes:
        raise ValueError(f"{test_store}: feature_dim/num_classes differ from {train_store}")
    mechanism = _mechanism(
        spec,
        heads,
        open_store=open_store,
        calibrate=calibrate,
        public_train_store=public_train_store,
        public_test_store=public_test_store,
    )
    timings: dict[str, float] = {}
    release = mechanism(train, timings, noise_key(spec) if spec.private else None)

    t = time.perf_counter()
    params = release.params
    confusion = confusion_matrix(test, params["weights"], params["bias"], **_bounds(release.head))
    timings["evaluate"] = time.perf_counter() - t
    record = _record(spec, train, test, release, confusion, timings).to_json()
    write_run_outputs(head_path, metrics_path, params, record)  # with checksums
    return record
