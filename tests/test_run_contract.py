"""The run contract: RunSpec from the rows of expand_runs, RunRecord's checks and field groups."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline_lib import experiments as xp
from pipeline_lib.run_contract import (
    INTERNAL_FIELDS,
    RELEASED_FIELDS,
    MetricsError,
    RunRecord,
    RunSpec,
    RunSpecError,
)

CONFIG = {
    "results_dir": "R",
    "datasets": {"d": {"source": "fashion_mnist"}, "pub": {"source": "fashion_mnist"}},
    "experiments": {
        "plain": {
            "dataset": "d",
            "backbone": "efficientnet_lite0",
            "image_size": 32,
            "epsilons": [1, 8],
            "delta": 1e-5,
            "seeds": [0, 1],
            "methods": {"dp_ls": {}, "dp_sgd": {"batch_size": 64}},
            "baselines": {"nonprivate_ridge": {}},
        },
        "tuned": {
            "dataset": "d",
            "backbone": "efficientnet_lite0",
            "image_size": 32,
            "epsilons": [4],
            "delta": 1e-5,
            "seeds": [0],
            "tuning": {"selection": "public", "public_dataset": "pub"},
            "methods": {"dp_ls": {"ridge_noise_factor": [0.1, 1.0]}},
        },
    },
}


def test_every_expanded_run_is_a_valid_spec_with_the_same_values():
    runs = xp.expand_runs(CONFIG)
    assert {r["experiment"] for r in runs} == {"plain", "tuned"}
    for run in runs:
        spec = RunSpec.from_dict(run)
        assert spec.identity == tuple(run[k] for k in xp.RUN_WILDCARDS)
        assert spec.epsilon == run["epsilon"] and spec.private == run["private"]
        assert [c.stats_file for c in spec.candidates] == [
            c["stats_file"] for c in run["candidates"]
        ]
        assert RunSpec.from_dict(spec) is spec
    tuned = next(RunSpec.from_dict(r) for r in runs if r["experiment"] == "tuned")
    assert len(tuned.candidates) == 2 and tuned.tuning["selection"] == "public"
    assert all(c.public_stats_file and c.final_stats_file for c in tuned.candidates)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r.pop("seed"), r"run plain/d/.*: run spec lacks key 'seed'"),
        (lambda r: r.update(epsilon="1"), r"key 'epsilon' must be int or float or null, got '1'"),
        (lambda r: r.update(private="yes"), r"key 'private' must be bool, got 'yes'"),
        (lambda r: r.update(seed=True), r"key 'seed' must be int, got True"),
        (lambda r: r.update(candidates=[]), r"key 'candidates' is empty"),
        (lambda r: r["candidates"][0].pop("transform"), r"candidates\[0\]: run spec lacks key"),
        (lambda r: r.update(delta=None), r"a private run needs epsilon and delta"),
    ],
)
def test_a_bad_spec_names_the_run_and_the_key(edit, match):
    run = next(r for r in xp.expand_runs(CONFIG) if r["method"] == "dp_ls" and r["private"])
    edit(run)
    with pytest.raises(RunSpecError, match=match):
        RunSpec.from_dict(run)


def test_record_fields_are_released_or_internal():
    names = {f.name for f in dataclasses.fields(RunRecord)}
    assert set(RELEASED_FIELDS) | set(INTERNAL_FIELDS) == names
    assert not set(RELEASED_FIELDS) & set(INTERNAL_FIELDS)
    # how the run executed: never part of what the privacy statement covers
    assert set(INTERNAL_FIELDS) == {
        "code_version", "jax_backend", "timings_s", "head_sha256", "content_sha256",
        "metrics_path",
    }  # fmt: skip
    for released in ("spent_epsilon", "dp_event_json", "noise_multipliers", "hyperparameters",
                     "tuning", "privacy_statement", "test_accuracy"):  # fmt: skip
        assert released in RELEASED_FIELDS


def _baseline() -> dict:
    return {
        "experiment": "e",
        "method": "nonprivate_ridge",
        "private": False,
        "seed": 0,
        "target_epsilon": None,
        "target_delta": None,
        "spent_epsilon": None,
        "spent_delta": None,
        "accountant": None,
        "neighboring_relation": None,
        "noise_multipliers": {},
        "test_accuracy": 0.5,
        "timings_s": {"fit": 1.0},
        "code_version": "0",
    }


def test_record_round_trip_and_views():
    run = _baseline()
    record = RunRecord.from_json(json.loads(json.dumps(run)), "m.json", metrics_path="m.json")
    assert record.seed == 0 and record["test_accuracy"] == 0.5
    assert record["metrics_path"] == "m.json" and "metrics_path" not in record.to_json()
    assert "dp_event_json" not in record  # optional keys stay absent, as the runner wrote them
    assert "timings_s" in record.to_json() and "timings_s" not in record.released()
    assert "code_version" not in record.released()
    assert RunRecord.from_json(record.to_json(), "again").to_json() == record.to_json()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"train_accuracy": 0.9}, r"^m\.json: unknown key\(s\) 'train_accuracy'"),
        ({"timings_s": [1.0]}, r"^m\.json: timings_s must be an object or null"),
        ({"seed": "0"}, r"^m\.json: seed must be an integer"),
        ({"spent_epsilon": 1.0}, r"^m\.json: private is false, but .*spent_epsilon"),
    ],
)
def test_a_bad_record_names_the_file_and_the_key(edit, match):
    with pytest.raises(MetricsError, match=match):
        RunRecord.from_json({**_baseline(), **edit}, "m.json")


def test_paths_come_from_the_patterns():
    run = next(r for r in xp.expand_runs(CONFIG) if r["method"] == "dp_ls" and r["private"])
    patterns = xp.run_patterns(CONFIG)
    out = xp.run_outputs(CONFIG, run)
    assert out["metrics"] == "R/runs/plain/d/efficientnet_lite0/32px/dp_ls/eps1/seed0/metrics.json"
    assert out["head"] == patterns["head"].format(**{k: run[k] for k in xp.RUN_WILDCARDS})
    assert run["candidates"][0]["stats_file"] == patterns["stats"].format(
        dataset="d", backbone="efficientnet_lite0", image_size=32, transform="normalize",
        clip="1", part="all",
    )  # fmt: skip
    files = xp.report_files(CONFIG, "plain")
    assert set(files) == set(xp.REPORT_FILES) and files["md"] == "R/reports/plain/summary.md"
    assert xp.index_files(CONFIG)["ledger_csv"] == "R/reports/ledger.csv"
    assert xp.all_reports(CONFIG)[:2] == [
        "R/reports/plain/accuracy_vs_epsilon.png",
        "R/reports/tuned/accuracy_vs_epsilon.png",
    ]
    assert "pipeline_lib" in xp.schema_path() and xp.load_schema()["type"] == "object"
