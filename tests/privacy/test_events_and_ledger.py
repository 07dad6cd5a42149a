import math

import dp_accounting
import pytest

from pipeline_lib.heads import make_head
from pipeline_lib.privacy import accounting
from pipeline_lib.privacy.events import event_from_json, event_to_json
from pipeline_lib.privacy.ledger import compose_ledger


@pytest.mark.parametrize(
    "method,params,extra",
    [
        ("dp_ls", {}, {}),
        ("dp_newton", {"num_steps": 2}, {}),
        ("dp_fc", {"num_steps": 3}, {}),
        ("dp_fc", {"num_steps": 3, "batch_size": 100}, {"num_examples": 5000}),
        ("dp_sgd", {"batch_size": 100, "epochs": 1}, {"num_examples": 5000}),
    ],
)
def test_every_head_event_round_trips_through_json(method, params, extra):
    import json

    head = make_head(method, params).calibrate(epsilon=1.0, delta=1e-5, **extra)
    event = head.dp_event()
    back = event_from_json(json.loads(json.dumps(event_to_json(event))))
    assert back == event
    assert accounting.epsilon_of(back, 1e-5, "pld") == accounting.epsilon_of(event, 1e-5, "pld")


def test_unknown_event_type_is_rejected():
    with pytest.raises(ValueError, match="unknown DpEvent type 'Magic'"):
        event_from_json({"type": "Magic"})


def _run(dataset, sigma, experiment="e", delta=1e-6, n=10000):
    event = dp_accounting.GaussianDpEvent(sigma)
    return {
        "private": True,
        "dataset": dataset,
        "experiment": experiment,
        "dp_event_json": event_to_json(event),
        "spent_epsilon": accounting.epsilon_of(event, delta, "pld"),
        "spent_delta": delta,
        "num_train": n,
    }


def test_ledger_composes_per_dataset_and_is_tight_for_gaussians():
    runs = [_run("a", 4.0), _run("a", 4.0, experiment="f"), _run("b", 2.0)]
    runs.append({"private": False, "dataset": "a"})  # baselines release nothing private
    rows = {r.dataset: r for r in compose_ledger(runs)}
    a = rows["a"]
    assert a.num_releases == 2 and a.experiments == ("e", "f")
    assert a.delta == pytest.approx(1e-6)
    # Two Gaussians with multiplier 4 are exactly one with multiplier 4/sqrt(2).
    exact = dp_accounting.get_epsilon_gaussian(4.0 / math.sqrt(2), 1e-6)
    assert exact <= a.epsilon_total <= exact * 1.01
    assert a.max_run_epsilon < a.epsilon_total < a.sum_run_epsilon
    assert rows["b"].num_releases == 1 and a.meaningful


def test_ledger_flags_vacuous_delta_and_missing_events():
    rows = compose_ledger([_run("a", 4.0, delta=2e-4, n=10000)] * 2)
    assert not rows[0].meaningful  # 2e-4 >= 1/N = 1e-4
    with pytest.raises(ValueError, match="no dp_event_json"):
        compose_ledger([{"private": True, "dataset": "a", "metrics_path": "m.json"}])
