"""End-to-end: the tiny workflow on a few hundred real Fashion-MNIST images, and lint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not FMNIST.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    work = tmp_path_factory.mktemp("wf")
    for name in ("config.yaml", "experiments.yaml"):
        shutil.copy(HERE / name, work / name)
    snakemake(work)
    return work


def test_tiny_workflow_beats_chance(tiny_run):
    report = tiny_run / "results" / "reports" / "tiny"
    for name in ("summary.csv", "summary.md", "accuracy_vs_epsilon.png"):
        assert (report / name).stat().st_size > 0
    runs = [
        json.loads(p.read_text()) for p in (tiny_run / "results" / "runs").rglob("metrics.json")
    ]
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


def test_rerun_does_nothing_and_new_epsilon_adds_only_its_runs(tiny_run):
    proc = snakemake(tiny_run, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    exps = yaml.safe_load((tiny_run / "experiments.yaml").read_text())
    exps["experiments"]["tiny"]["epsilons"].append(4)
    edited = tiny_run / "experiments_more.yaml"
    edited.write_text(yaml.safe_dump(exps))
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["experiments_file"] = str(edited)
    (tiny_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tiny_run, "-n")
    counts = job_counts(proc.stdout + proc.stderr)
    # 4 private methods x 2 seeds at the new epsilon, one report; nothing else recomputed
    assert counts == {"fit_head": 8, "report_experiment": 1, "all": 1, "total": 10}, counts


def job_counts(text: str) -> dict[str, int]:
    """Parse snakemake's dry-run 'Job stats' table."""
    lines = text[text.index("Job stats:") :].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_bad_config_fails_clearly_and_writes_nothing(tmp_path):
    for name in ("config.yaml", "experiments.yaml"):
        shutil.copy(HERE / name, tmp_path / name)
    exps = yaml.safe_load((tmp_path / "experiments.yaml").read_text())
    exps["experiments"]["tiny"]["epsilons"] = [-1]
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(exps))
    proc = snakemake(tmp_path, check=False)
    assert proc.returncode != 0
    assert "epsilons" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_lint():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--lint",
            "-s",
            str(ROOT / "Snakefile"),
            "--directory",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


def test_released_head_reproduces_reported_accuracy(tiny_run):
    from pipeline_lib.features.store import FeatureStore
    from pipeline_lib.heads.released import load_head

    run = tiny_run / "results" / "runs" / "tiny" / "dp_ls" / "eps8" / "seed0"
    head = load_head(run / "head.npz")
    metrics = json.loads((run / "metrics.json").read_text())
    assert head.private and head.epsilon == metrics["spent_epsilon"] <= 8
    assert head.metadata["noise_multipliers"] == metrics["noise_multipliers"]
    store = FeatureStore(
        tiny_run / "results/features/fashion_mnist_tiny/efficientnet_lite0/32px/test.zarr"
    )
    x, y = store.read_all()
    assert np.mean(head.predict(x) == y) == pytest.approx(metrics["test_accuracy"])
    with pytest.raises(ValueError, match="features must have shape"):
        head.predict(x[:, :10])
