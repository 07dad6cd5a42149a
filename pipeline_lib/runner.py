"""One head run: calibrate, (tune,) fit, evaluate, and write head.npz + metrics.json."""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

import pipeline_lib
from pipeline_lib.features.centered import CenteredRows
from pipeline_lib.features.split import RowSubset
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads import STATS_HEADS, make_head
from pipeline_lib.heads.linear import accuracy, confusion_matrix, num_correct
from pipeline_lib.heads.released import feature_provenance
from pipeline_lib.heads.stats import load_stats
from pipeline_lib.privacy import accounting, noise
from pipeline_lib.privacy import selection as tn
from pipeline_lib.privacy.events import event_to_json
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


def _fit(head, method: str, data, stats_file: str | None, **fit_kw) -> dict:
    """Fit on streamed ``data`` or, for statistics heads, on the cached statistics.

    ``fit_kw`` is ``key=<NoiseKey>`` for a private head, ``seed=<int>`` for a baseline.
    A head with private centring streams ``data`` whatever its method (`heads.centered`).
    """
    if method in STATS_HEADS and not getattr(head, "center", False):
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


def run_identity(spec: dict) -> tuple:
    """The run's public identity (all of it is in its path and metrics.json)."""
    keys = ("experiment", "dataset", "backbone", "image_size", "method", "budget", "seed")
    return tuple(spec[k] for k in keys)


def noise_key(spec: dict) -> noise.NoiseKey:
    """The run's base noise key: fresh OS randomness unless the experiment asks for
    ``noise: {mode: reproducible}`` (tests only; its outputs say they are not private).

    Called once per job: a rerun of the same run is a new release with new noise.
    """
    return noise.key_for_run(spec.get("noise"), run_identity(spec))


def noise_record(spec: dict) -> dict:
    """What metrics.json says about the noise's randomness (never the key itself)."""
    cfg = dict(spec.get("noise") or {"mode": "secret"})
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


def _rows_for(data, params: dict, head):
    """``data`` as the fitted head sees it: centred by its released mean when it has one."""
    if params.get("center") is None:
        return data
    return CenteredRows(data, params["center"], **_bounds(head))


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


def _private_record(
    head,
    spec: dict,
    *,
    spent: float,
    event,
    covered: str,
    tuning,
    public: dict,
    accountant: str | None = None,
) -> dict:
    delta = float(spec["delta"])
    reproducible = noise_record(spec)["mode"] == "reproducible"
    accountant = accountant or head.accountant
    if getattr(head, "center", False):
        covered += ", and the noisy mean of the bounded training features it centres by"
    return dict(
        differentially_private=not reproducible,
        public_quantities=public,
        target_epsilon=float(spec["epsilon"]),
        target_delta=delta,
        spent_epsilon=spent,
        spent_delta=delta,
        accountant=accountant,
        neighboring_relation=accounting.NEIGHBORING_RELATION,
        noise_multipliers=head.noise_multipliers(),
        dp_event=str(event),
        dp_event_json=event_to_json(event),
        privacy_statement=accounting.privacy_statement(
            method=spec["method"],
            epsilon=spent,
            delta=delta,
            accountant=accountant,
            covered=covered,
            tuning=tuning,
            public=public,
            reproducible=reproducible,
        ),
    )


def _calibrate(head, *, epsilon: float, delta: float, num_examples: int):
    return head.calibrate(epsilon=epsilon, delta=delta, num_examples=num_examples)


def _run_untuned(
    spec, head, train, timings, key: noise.NoiseKey, calibrate=_calibrate
) -> tuple[dict, dict]:
    eps, delta = float(spec["epsilon"]), float(spec["delta"])
    t = time.perf_counter()
    head = calibrate(head, epsilon=eps, delta=delta, num_examples=train.num_examples)
    timings["calibrate"] = time.perf_counter() - t
    event = head.dp_event()
    spent = accounting.spend(event, target_epsilon=eps, delta=delta, accountant=head.accountant)
    public = _public_quantities(head, num_train=train.num_examples)
    record = _private_record(
        head, spec, spent=spent, event=event, covered=COVERED, tuning=None, public=public
    )
    record.update(per_run_epsilon=spent, epsilon_covers_tuning=False, tuning=None)
    t = time.perf_counter()
    stats_file = spec["candidates"][0].get("stats_file")
    params = _fit(head, spec["method"], train, stats_file, key=key)
    timings["fit"] = time.perf_counter() - t
    return record, {"params": params, "head": head}


def _run_private_selection(spec, heads, train, timings, key: noise.NoiseKey):
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
    t = time.perf_counter()
    fitted, correct = [], []
    for g, (head, cand) in enumerate(zip(joint.heads, spec["candidates"], strict=True)):
        params = _fit(head, spec["method"], fit_part, cand["stats_file"], key=key.child("cand", g))
        fitted.append(params)
        val = _rows_for(validation, params, head)
        correct.append(num_correct(val, params["weights"], params["bias"], **_bounds(head)))
    selected, noisy = tn.noisy_selection(
        correct,
        noise_multiplier=joint.selection_noise_multiplier,
        key=key.child("selection"),
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
        public=_public_quantities(
            joint.heads[selected],
            num_train=train.num_examples,
            num_fit=fit_part.num_examples,
            num_val=n_val,
        ),
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


COVERED_RS = (
    "the released head weights (head.npz), its hyperparameters and its noisy validation "
    "score: the best of a random number of trials, each a random candidate; the number of "
    "trials, the other trials and their scores are never released"
)


def _run_repeat_and_select(spec, heads, train, timings, key: noise.NoiseKey):
    """Papernot & Steinke's repeat-and-select (see `privacy.selection`).

    Released: the winning trial's weights, hyperparameters and noisy score. Not
    released, and not written anywhere: the number of trials K, which candidates ran,
    the losers' scores and the fit time (which would reveal K).
    """
    eps, delta = float(spec["epsilon"]), float(spec["delta"])
    tuning = spec["tuning"]
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
        cand = spec["candidates"][g]
        params = _fit(rs.heads[g], spec["method"], fit_part, cand["stats_file"], key=trial)
        val = _rows_for(validation, params, heads[g])
        correct = num_correct(val, params["weights"], params["bias"], **_bounds(heads[g]))
        score = tn.noisy_score(correct, noise_multiplier=rs.score_noise_multiplier, key=trial)
        if best is None or score > best[0]:
            best = (score, int(g), params)
    if best is None:  # Poisson law, K = 0: the mechanism outputs "nothing" (accounted)
        d, k = train.feature_dim, train.num_classes
        best = (None, 0, {"weights": np.zeros((d, k), np.float32), "bias": np.zeros(k, np.float32)})
        if getattr(rs.heads[0], "center", False):  # a constant, like the weights: no release
            best[2]["center"] = np.zeros(d, np.float32)
    score, selected, params = best
    law = tuning.get("trials_law", "geometric")
    how = (
        f"repeat-and-select (Papernot & Steinke 2022) over {len(heads)} candidates: a random "
        f"number of trials ({law}, mean {mean:g}), each a random candidate scored by noisy "
        f"validation accuracy on a held-out {fraction:g} of the training split; only the "
        "best trial is released"
    )
    record = _private_record(
        rs.heads[selected],
        spec,
        spent=rs.spent_epsilon,
        event=rs.event,
        covered=COVERED_RS,
        tuning=how,
        public=_public_quantities(
            rs.heads[selected],
            num_train=train.num_examples,
            num_fit=fit_part.num_examples,
            num_val=validation.num_examples,
        ),
        accountant="rdp",
    )
    record.update(
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
    return record, {"params": params, "head": rs.heads[selected]}


def _run_public_selection(spec, heads, train, public_train, public_test, timings, key):
    eps, delta = float(spec["epsilon"]), float(spec["delta"])
    t = time.perf_counter()
    scores = []
    for g, (head, cand) in enumerate(zip(heads, spec["candidates"], strict=True)):
        h = head.calibrate(epsilon=eps, delta=delta, num_examples=public_train.num_examples)
        params = _fit(
            h, spec["method"], public_train, cand.get("public_stats_file"), key=key.child("pub", g)
        )
        pub_test = _rows_for(public_test, params, h)
        scores.append(accuracy(pub_test, params["weights"], params["bias"], **_bounds(h)))
    selected = int(np.argmax(scores))
    timings["tune_public"] = time.perf_counter() - t
    record, out = _run_untuned(
        dict(
            spec, candidates=[{"stats_file": spec["candidates"][selected].get("final_stats_file")}]
        ),
        heads[selected],
        train,
        timings,
        key,
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
        public=record["public_quantities"],
        reproducible=not record["differentially_private"],
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
    open_store=FeatureStore,
    calibrate=_calibrate,
) -> dict:
    """Run one (experiment, dataset, backbone, method, budget, seed) and write its outputs.

    `spec` is one row of `pipeline_lib.experiments.expand_runs`. head.npz is
    written first and metrics.json last, each by atomic rename, so a run with
    a metrics file is a finished run. ``open_store`` and ``calibrate`` let a warm
    process (`pipeline_lib.sweep`) reuse verified stores and public calibrations;
    the noise key is drawn here for every call, whatever they are.
    """
    timings: dict[str, float] = {}
    method = spec["method"]
    where = f"experiment {spec['experiment']!r}, method {method!r}"
    heads = [make_head(method, c["hyperparameters"], where=where) for c in spec["candidates"]]
    train = open_store(train_store)
    test = open_store(test_store)
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
        # the underlying data (files or TFDS name, and split): the ledger composes every
        # release that read the same data, whatever the dataset key or subset size
        "data_source": f"{train.attrs.get('source', spec['dataset'])} [{train.attrs.get('split')}]",
        "feature_dim": train.feature_dim,
        "num_classes": train.num_classes,
        "code_version": pipeline_lib.__version__,
        "jax_backend": jax.default_backend(),
        **feature_provenance(train),  # class names, backbone, checkpoint, preprocessing
    }
    tuning = spec.get("tuning")
    if not heads[0].private:
        t = time.perf_counter()
        head = heads[0]
        stats_file = spec["candidates"][0].get("stats_file")
        params = _fit(head, method, train, stats_file, seed=int(spec["seed"]))
        out = {"params": params, "head": head}
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
            differentially_private=False,
            noise=None,
            privacy_statement=NONPRIVATE_STATEMENT,
        )
    elif tuning is None or len(heads) == 1:
        record["noise"] = noise_record(spec)
        private, out = _run_untuned(
            spec, heads[0], train, timings, noise_key(spec), calibrate=calibrate
        )
        record.update(private)
    elif tuning["selection"] == "private":
        record["noise"] = noise_record(spec)
        private, out = _run_private_selection(spec, heads, train, timings, noise_key(spec))
        record.update(private)
    elif tuning["selection"] == "repeat_and_select":
        record["noise"] = noise_record(spec)
        private, out = _run_repeat_and_select(spec, heads, train, timings, noise_key(spec))
        record.update(private)
    else:
        if public_train_store is None or public_test_store is None:
            raise ValueError(f"{where}: public selection needs the public dataset's stores")
        pub_train, pub_test = open_store(public_train_store), open_store(public_test_store)
        record["noise"] = noise_record(spec)
        private, out = _run_public_selection(
            spec, heads, train, pub_train, pub_test, timings, noise_key(spec)
        )
        record.update(private)
    head, params = out["head"], out["params"]
    record["hyperparameters"] = head.hyperparameters()

    t = time.perf_counter()
    if params.get("center") is not None:  # private centring: mu~ is part of the release
        record["feature_center"] = head.center_record(params["center"])
    evaluated = _rows_for(test, params, head)
    confusion = confusion_matrix(evaluated, params["weights"], params["bias"], **_bounds(head))
    record["test_accuracy"] = float(np.trace(confusion)) / test.num_examples
    # Test-split evaluation (not covered by the guarantee, like the accuracy): rows are true
    # labels, columns predictions; the reports draw it for the best seed of each setting.
    record["test_confusion"] = confusion.tolist()
    # No training-set accuracy: it is a statistic of the private data that the
    # DP guarantee does not cover, so it is never written out.
    timings["evaluate"] = time.perf_counter() - t
    record["timings_s"] = timings

    write_run_outputs(head_path, metrics_path, params, record)  # with checksums
    return record
