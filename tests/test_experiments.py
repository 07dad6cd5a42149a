import copy

import pytest
import yaml

from pipeline_lib import experiments as xp

BASE = {
    "results_dir": "results",
    "datasets": {"fm": {"source": "fashion_mnist"}},
    "experiments": {
        "e1": {
            "dataset": "fm",
            "backbone": "efficientnet_lite0",
            "image_size": 64,
            "epsilons": [0.5, 1, 8],
            "delta": 1e-5,
            "seeds": [0, 1],
            "methods": {"dp_ls": {"l2_clip_norm": 2.0}},
            "baselines": {"nonprivate_ridge": None, "nonprivate_logistic": {"epochs": 2}},
        }
    },
}


def test_expansion_counts_and_paths():
    runs = xp.expand_runs(BASE)
    private = [r for r in runs if r["private"]]
    assert len(private) == 3 * 2 and len(runs) == 6 + 2
    assert {r["budget"] for r in private} == {"eps0.5", "eps1", "eps8"}
    r = private[0]
    assert r["hyperparameters"]["accountant"] == "pld"  # experiment default applied
    assert r["hyperparameters"]["l2_clip_norm"] == 2.0
    inputs = xp.run_inputs(BASE, r)
    assert inputs["stats"] == "results/stats/fm/efficientnet_lite0/64px/normalize-C2.npz"
    assert inputs["train"] == "results/features/fm/efficientnet_lite0/64px/train.zarr"
    out = xp.run_outputs(BASE, r)
    assert out["metrics"] == "results/runs/e1/dp_ls/eps0.5/seed0/metrics.json"
    logistic = [r for r in runs if r["method"] == "nonprivate_logistic"]
    assert len(logistic) == 1 and "stats" not in xp.run_inputs(BASE, logistic[0])


def test_adding_an_epsilon_only_adds_runs():
    cfg = copy.deepcopy(BASE)
    cfg["experiments"]["e1"]["epsilons"].append(2)
    before = {xp.run_outputs(BASE, r)["metrics"] for r in xp.expand_runs(BASE)}
    after = {xp.run_outputs(cfg, r)["metrics"] for r in xp.expand_runs(cfg)}
    assert before < after and len(after - before) == 2


def test_default_experiments_file_expands():
    cfg = yaml.safe_load(open("config/config.yaml"))
    cfg["experiments"] = yaml.safe_load(open(cfg["experiments_file"]))["experiments"]
    runs = xp.expand_runs(cfg)
    eps = sorted({r["epsilon"] for r in runs if r["private"]})
    assert eps == [0.25, 0.5, 1, 2, 4, 8]


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("dataset",), "mnist", r"experiment 'e1': dataset 'mnist' is not defined"),
        (("epsilons",), [0, 1], r"experiment 'e1': target epsilon must be > 0, got 0"),
        (("delta",), 1.5, r"experiment 'e1': target delta must be in \(0, 1\)"),
        (("seeds",), [1, 1], "distinct"),
        (("accountant",), "zcdp", r"accountant='zcdp'; allowed: \['pld', 'rdp'\]"),
        (("methods", "dp_magic"), {}, r"methods.dp_magic: unknown method"),
        (
            ("methods", "dp_sgd"),
            {"num_examples": 5},
            r"unknown hyperparameter\(s\) \['num_examples'\]",
        ),
        (("methods", "dp_ls", "l2_clip_norm"), -1, "l2_clip_norm must be > 0"),
        (("methods", "dp_ls", "lambda"), 1, r"unknown hyperparameter\(s\) \['lambda'\]"),
        (("baselines", "dp_ls"), {}, "dp_ls is private"),
    ],
)
def test_bad_config_names_experiment_key_and_value(path, value, match):
    cfg = copy.deepcopy(BASE)
    node = cfg["experiments"]["e1"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(xp.ConfigError, match=match):
        xp.expand_runs(cfg)


def test_missing_required_key():
    cfg = copy.deepcopy(BASE)
    del cfg["experiments"]["e1"]["delta"]
    with pytest.raises(xp.ConfigError, match="experiment 'e1': missing required key 'delta'"):
        xp.expand_runs(cfg)
