"""run_head end to end on small synthetic stores: untuned, private and public selection."""

import json

import numpy as np
import pytest


def test_untuned_run_does_not_claim_tuning(stores, make_config, run_method):
    root, st = stores
    record, _ = run_method(root, st, make_config(root, {"dp_ls": {}}), "dp_ls")
    assert record["epsilon_covers_tuning"] is False
    assert record["per_run_epsilon"] == record["spent_epsilon"] <= 2.0
    assert "Not covered: hyperparameter choices" in record["privacy_statement"]
    assert record["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "method,grid",
    [("dp_ls", {"ridge_noise_factor": [0.05, 1.0, 4.0]}), ("dp_fc", {"num_steps": [1, 3]})],
)
def test_private_selection_composes_everything(stores, method, grid, make_config, run_method):
    root, st = stores
    cfg = make_config(root, {method: grid}, {"selection": "private", "validation_fraction": 0.2})
    record, out = run_method(root, st, cfg, method)
    assert record["epsilon_covers_tuning"] is True
    assert record["spent_epsilon"] <= 2.0 and record["spent_epsilon"] > 0.99 * 2.0
    assert record["per_run_epsilon"] < record["spent_epsilon"]
    tuning = record["tuning"]
    assert tuning["num_candidates"] == len(next(iter(grid.values())))
    assert all(c["epsilon_alone"] < 2.0 for c in tuning["candidates"])
    assert record["num_train_fit"] + round(0.2 * 3000) == pytest.approx(3000, abs=60)
    # the released event is the composition of all candidates and the selection
    assert record["dp_event_json"]["type"] == "ComposedDpEvent"
    assert len(record["dp_event_json"]["events"]) == tuning["num_candidates"] + 1
    assert record["test_accuracy"] > 0.7
    saved = json.loads(open(out["metrics"]).read())
    assert saved["tuning"]["selected"] == tuning["selected"]


def test_public_selection_pays_for_one_private_run(stores, make_config, run_method):
    root, st = stores
    cfg = make_config(
        root,
        {"dp_ls": {"ridge_noise_factor": [0.05, 4.0]}},
        {"selection": "public", "public_dataset": "pub"},
    )
    record, _ = run_method(root, st, cfg, "dp_ls")
    assert record["epsilon_covers_tuning"] is True
    assert record["per_run_epsilon"] == record["spent_epsilon"] <= 2.0
    accs = [c["public_test_accuracy"] for c in record["tuning"]["candidates"]]
    assert record["tuning"]["selected"] == int(np.argmax(accs))
    assert "public dataset 'pub'" in record["privacy_statement"]
    assert record["dp_event_json"]["type"] == "ComposedDpEvent"  # dp_ls alone: 2 Gaussians
    assert len(record["dp_event_json"]["events"]) == 2


def test_repeat_and_select_releases_only_the_winning_trial(
    stores, make_config, run_method, monkeypatch
):
    from pipeline_lib import runner
    from pipeline_lib.privacy import selection

    trials = []
    real_fit, real_score = runner._fit, selection.noisy_score

    def fit(head, *args, **kw):
        out = real_fit(head, *args, **kw)
        trials.append({"weights": out["weights"].copy()})
        return out

    def score(correct, **kw):
        value = real_score(correct, **kw)
        trials[-1]["score"] = value
        return value

    monkeypatch.setattr(runner, "_fit", fit)
    monkeypatch.setattr(selection, "noisy_score", score)
    root, st = stores
    grid = {"ridge_noise_factor": [0.05, 0.25, 1.0]}
    tuning = {"selection": "repeat_and_select", "mean_trials": 4, "validation_fraction": 0.2}
    record, out = run_method(root, st, make_config(root, {"dp_ls": grid}, tuning), "dp_ls")
    assert len(trials) >= 1
    best = max(trials, key=lambda t: t["score"])
    with np.load(out["head"]) as z:
        np.testing.assert_array_equal(z["weights"], best["weights"])
    t = record["tuning"]
    # exactly these fields: the winner, its noisy score and public settings; never the
    # number of trials, the other trials, their scores, or the fit time (which reveals K)
    assert set(t) == {
        "selection", "validation_fraction", "num_candidates", "mean_trials", "trials_law",
        "trials_shape", "selected", "score_noise_multiplier", "noise_factor",
        "noisy_validation_accuracy", "candidates",
    }  # fmt: skip
    assert all(set(c) == {"hyperparameters"} for c in t["candidates"])
    n_val = record["public_quantities"]["num_validation"]
    assert t["noisy_validation_accuracy"] == pytest.approx(best["score"] / n_val)
    assert "fit" not in record["timings_s"]
    assert record["accountant"] == "rdp" and record["epsilon_covers_tuning"] is True
    assert record["dp_event_json"]["type"] == "RepeatAndSelectDpEvent"
    assert record["spent_epsilon"] <= 2.0 and record["per_run_epsilon"] < record["spent_epsilon"]
    assert "repeat-and-select" in record["privacy_statement"]
    assert record["test_accuracy"] > 0.7
