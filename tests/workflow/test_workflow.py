"""End-to-end: the tiny workflow on a few hundred real Fashion-MNIST images, and lint.

The run itself is the session fixture `tiny_workflow` (tests/conftest.py), shared with
tests/features/test_rules.py and tests/test_classify.py; tests that change it take a copy.
"""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.snakemake_cmd import (
    FMNIST,
    ROOT,
    WORKFLOW_TESTS,
    copy_workflow,
    job_counts,
    run_snakemake,
    tiny_config,
)

pytestmark = pytest.mark.slow
SETTING = Path("fashion_mnist_tiny", "efficientnet_lite0", "32px")


def RUNS(work: Path) -> Path:  # noqa: N802
    return work / "results" / "runs"


def test_tiny_workflow_beats_chance(tiny_workflow):
    report = tiny_workflow / "results" / "reports" / "tiny"
    for name in ("summary.csv", "summary.md", "accuracy_vs_epsilon.png"):
        assert (report / name).stat().st_size > 0
    runs = [json.loads(p.read_text()) for p in RUNS(tiny_workflow).rglob("metrics.json")]
    for method in ("dp_ls", "dp_newton", "dp_fc", "dp_sgd"):
        acc = sorted(
            r["test_accuracy"] for r in runs if r["method"] == method and r["target_epsilon"] == 8
        )
        assert len(acc) == 2, method
        assert acc[0] > 0.4, (method, acc)  # chance is 0.1 on 10 balanced classes
    for r in runs:
        if r["private"]:
            assert r["spent_epsilon"] <= r["target_epsilon"]
            assert r["neighboring_relation"] == "add_or_remove_one"
            assert "add-or-remove-one" in r["privacy_statement"]
        else:
            assert "NON-PRIVATE" in r["privacy_statement"]
    md = (report / "summary.md").read_text()
    assert "non-private" in md and "dp_ls" in md


def test_rerun_does_nothing_and_new_epsilon_adds_only_its_runs(tiny_workflow_copy):
    work = tiny_workflow_copy
    proc = run_snakemake(work, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    exps = yaml.safe_load((work / "experiments.yaml").read_text())
    exps["experiments"]["tiny"]["epsilons"].append(4)
    edited = work / "experiments_more.yaml"
    edited.write_text(yaml.safe_dump(exps))
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["experiments_file"] = str(edited)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n")
    counts = job_counts(proc.stdout + proc.stderr)
    # 4 private methods x 2 seeds at the new epsilon, its experiment's report and the
    # cross-experiment index; no extraction, no statistics, no other head run
    assert counts == {
        "fit_head": 8,
        "report_experiment": 1,
        "report_index": 1,
        "all": 1,
        "total": 11,
    }, counts


def test_bad_config_fails_clearly_and_writes_nothing(tmp_path):
    tiny_config(tmp_path)
    exps = yaml.safe_load((tmp_path / "experiments.yaml").read_text())
    exps["experiments"]["tiny"]["epsilons"] = [-1]
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(exps))
    proc = run_snakemake(tmp_path, check=False)
    assert proc.returncode != 0
    assert "epsilons" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_lint():
    # the repository's own config (config/config.yaml), as a user would lint it
    proc = run_snakemake(ROOT, "--lint", configfile=False, cores=None, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


def test_released_head_reproduces_reported_accuracy(tiny_workflow):
    from pipeline_lib.features.store import FeatureStore
    from pipeline_lib.heads.released import load_head

    run = RUNS(tiny_workflow) / "tiny" / SETTING / "dp_ls" / "eps8" / "seed0"
    head = load_head(run / "head.npz")
    metrics = json.loads((run / "metrics.json").read_text())
    assert head.private and head.epsilon == metrics["spent_epsilon"] <= 8
    assert head.metadata["noise_multipliers"] == metrics["noise_multipliers"]
    store = FeatureStore(
        tiny_workflow / "results/features/fashion_mnist_tiny/efficientnet_lite0/32px/test.zarr"
    )
    x, y = store.read_all()
    assert np.mean(head.predict(x) == y) == pytest.approx(metrics["test_accuracy"])
    with pytest.raises(ValueError, match="features must have shape"):
        head.predict(x[:, :10])


def _metrics(work: Path, experiment: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in (RUNS(work) / experiment).rglob("metrics.json")]


def test_tuned_experiment_reports_per_run_and_total_epsilon(tiny_workflow):
    runs = _metrics(tiny_workflow, "tiny_tuned")
    assert sorted(r["method"] for r in runs) == ["dp_ls", "dp_sgd"]
    for r in runs:
        assert r["epsilon_covers_tuning"] is True
        assert r["spent_epsilon"] <= r["target_epsilon"] == 4
        assert r["per_run_epsilon"] < r["spent_epsilon"]  # one candidate alone costs less
        tuning = r["tuning"]
        assert tuning["selection"] == "private" and tuning["num_candidates"] == 2
        assert tuning["selected"] in (0, 1)
        assert r["hyperparameters"] == tuning["candidates"][tuning["selected"]]["hyperparameters"]
        assert "IS covered" in r["privacy_statement"]
        assert r["num_train_fit"] < r["num_train"]
    untuned = _metrics(tiny_workflow, "tiny")
    assert all(r["epsilon_covers_tuning"] is False for r in untuned if r["private"])
    report = tiny_workflow / "results" / "reports" / "tiny_tuned"
    md = (report / "summary.md").read_text()
    assert "tuned, ε covers tuning" in md and "Per-run ε" in md
    rows = list(csv.DictReader(open(report / "runs.csv")))
    assert {row["epsilon_covers_tuning"] for row in rows} == {"true"}
    assert all(float(row["per_run_epsilon"]) < float(row["spent_epsilon"]) for row in rows)


def test_index_ledger_and_terminal_summary(tiny_workflow):
    reports = tiny_workflow / "results" / "reports"
    ledger = list(csv.DictReader(open(reports / "ledger.csv")))
    assert [row["dataset"] for row in ledger] == ["fashion_mnist_tiny"]
    (row,) = ledger
    assert int(row["num_releases"]) == 4 * 2 * 2 + 2  # tiny: methods x eps x seeds; tuned: 2
    assert float(row["max_run_epsilon"]) < float(row["epsilon_total"])
    assert float(row["epsilon_total"]) <= float(row["sum_run_epsilon"])
    assert float(row["delta"]) == 1e-4 and row["meaningful"] == "True"  # 1e-4 < 1/600
    index = (reports / "index.md").read_text()
    assert "## Privacy ledger" in index and "fashion_mnist_tiny" in index
    assert (reports / "all_experiments.png").stat().st_size > 0
    out = (tiny_workflow / "snakemake.out").read_text()
    assert "best method per target ε" in out and "reports/index.md" in out


def test_html_report_contains_every_run(tiny_workflow, tmp_path):
    html = tmp_path / "report.html"
    run_snakemake(tiny_workflow, "--report", str(html))
    text = _report_text(html)
    for r in _metrics(tiny_workflow, "tiny") + _metrics(tiny_workflow, "tiny_tuned"):
        assert repr(r["test_accuracy"]) in text, r["method"]
        if r["private"]:
            assert repr(r["spent_epsilon"]) in text, r["method"]
    assert "privacy ledger" in text.lower()


def _report_text(path: Path) -> str:
    """The HTML with every embedded (base64) file decoded, so tables can be searched."""
    import base64
    import re

    text = path.read_text(errors="replace")
    decoded = []
    for blob in re.findall(r"data:[^\"',]*;base64,([A-Za-z0-9+/=]+)", text):
        try:
            decoded.append(base64.b64decode(blob).decode("utf-8", errors="replace"))
        except ValueError:
            continue
    return text + "\n".join(decoded)


@pytest.mark.parametrize(
    "edit,match",
    [
        ("unknown_key", r"experiment 'tiny', key \(entry\): Additional properties.*'learning'"),
        ("duplicate", r"duplicate key 'tiny'"),
        ("wrong_type", r"experiment 'tiny', key seeds: value 'two'"),
        ("empty_grid", r"methods.dp_sgd.learning_rate: value \[\]"),
        ("unknown_method", r"'dp_magic' was unexpected"),
        ("unknown_backbone", r"backbone 'resnet9000' is unknown"),
        ("unknown_dataset", r"dataset 'imagenet_typo' is not defined"),
        (
            "missing_data",
            r"datasets.fashion_mnist_tiny.data_dir: /nonexistent/fmnist does not hold",
        ),
    ],
)
def test_bad_input_fails_clearly_and_leaves_nothing(tmp_path, edit, match):
    tiny_config(tmp_path)
    exp_path, cfg_path = tmp_path / "experiments.yaml", tmp_path / "config.yaml"
    text = exp_path.read_text()
    if edit == "unknown_key":
        text = text.replace("    image_size: 32\n", "    image_size: 32\n    learning: 3\n", 1)
    elif edit == "duplicate":
        text = text.replace("experiments:\n", "experiments:\n  tiny:\n    dataset: x\n", 1)
    elif edit == "wrong_type":
        text = text.replace("seeds: [0, 1]", "seeds: two", 1)
    elif edit == "empty_grid":
        text = text.replace("dp_sgd: {batch_size: 128, epochs: 5}", "dp_sgd: {learning_rate: []}")
    elif edit == "unknown_method":
        text = text.replace("dp_fc:", "dp_magic:", 1)
    elif edit == "unknown_backbone":
        text = text.replace("backbone: efficientnet_lite0", "backbone: resnet9000", 1)
    elif edit == "unknown_dataset":
        text = text.replace("dataset: fashion_mnist_tiny", "dataset: imagenet_typo", 1)
    elif edit == "missing_data":
        cfg = cfg_path.read_text()
        cfg_path.write_text(cfg.replace(str(FMNIST), "/nonexistent/fmnist"))
    exp_path.write_text(text)
    proc = run_snakemake(tmp_path, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(match, out), out[-3000:]
    assert not (tmp_path / "results").exists()


# --- secret noise through the workflow (on a copy of the tiny workflow: they rerun jobs) ---

NOISE_EXPERIMENTS = {
    "tiny_release": {  # release-ready: no non-private baselines, secret noise (the default)
        "dataset": "fashion_mnist_tiny",
        "backbone": "efficientnet_lite0",
        "image_size": 32,
        "epsilons": [1],
        "delta": 1.0e-4,
        "seeds": [0],
        "methods": {"dp_ls": {}},
        "baselines": {},
    },
    "tiny_repro": {  # tests/debugging only: NOT private
        "dataset": "fashion_mnist_tiny",
        "backbone": "efficientnet_lite0",
        "image_size": 32,
        "epsilons": [1],
        "delta": 1.0e-4,
        "seeds": [0],
        "noise": {"mode": "reproducible", "seed": 0},
        "methods": {"dp_ls": {}},
        "baselines": {},
    },
}


@pytest.fixture(scope="module")
def noise_run(tiny_workflow, tmp_path_factory):
    work = copy_workflow(tiny_workflow, tmp_path_factory.mktemp("noise") / "wf")
    exps = yaml.safe_load((WORKFLOW_TESTS / "experiments.yaml").read_text())
    exps["experiments"].update(NOISE_EXPERIMENTS)
    edited = work / "experiments_noise.yaml"
    edited.write_text(yaml.safe_dump(exps))
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["experiments_file"] = str(edited)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_snakemake(work)
    return work


def _weights(run_dir: Path) -> np.ndarray:
    with np.load(run_dir / "head.npz") as z:
        return np.concatenate([z["weights"].ravel(), z["bias"].ravel()])


def test_forced_rerun_is_a_new_release_unless_noise_is_reproducible(noise_run):
    private = RUNS(noise_run) / "tiny_release" / SETTING / "dp_ls" / "eps1" / "seed0"
    repro = RUNS(noise_run) / "tiny_repro" / SETTING / "dp_ls" / "eps1" / "seed0"
    before = {p: _weights(p) for p in (private, repro)}
    for run in (private, repro):
        run_snakemake(noise_run, "-f", str((run / "metrics.json").relative_to(noise_run)))
    assert not np.allclose(_weights(private), before[private])  # new secret key, new noise
    np.testing.assert_array_equal(_weights(repro), before[repro])
    meta = json.loads((repro / "metrics.json").read_text())
    assert meta["differentially_private"] is False
    assert meta["privacy_statement"].startswith("NOT differentially private")
    with np.load(repro / "head.npz") as z:
        assert "NOT differentially private" in str(z["metadata"])


def test_reports_state_the_guarantee_and_keep_reproducible_runs_apart(noise_run):
    reports = noise_run / "results" / "reports"
    release_md = (reports / "tiny_release" / "summary.md").read_text()
    assert "What the privacy guarantee covers" in release_md and "Treated as public" in release_md
    assert "| non-private |" not in release_md  # baselines: {} drops them
    repro_md = (reports / "tiny_repro" / "summary.md").read_text()
    assert "NOT DP (reproducible noise" in repro_md
    (row,) = list(csv.DictReader(open(reports / "ledger.csv")))
    assert int(row["num_releases"]) == 4 * 2 * 2 + 2 + 1  # + tiny_release, not tiny_repro
    index = (reports / "index.md").read_text()
    assert "1 run(s) with reproducible noise (NOT DP)" in index
    assert "outside any guarantee" in index and "Not protected against" in index
