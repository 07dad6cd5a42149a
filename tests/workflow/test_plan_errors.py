"""Mistakes stop `snakemake` when the run is planned, with the hint, before any job runs."""

from pathlib import Path

import pytest
import yaml

from tests.snakemake_cmd import FMNIST, run_snakemake, tiny_config

pytestmark = pytest.mark.slow  # a snakemake process per test


def dry_run(work: Path) -> str:
    proc = run_snakemake(work, "-n", cores=1, check=False, timeout=300)
    assert proc.returncode != 0, "the dry run should have failed"
    out = proc.stdout + proc.stderr
    assert not (work / "results").exists()
    return out


@pytest.fixture
def work(tmp_path):
    if not FMNIST.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    return tiny_config(tmp_path)


def edit(path: Path, change) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))


def test_delta_spelt_1e_5(work):
    path = work / "experiments.yaml"
    path.write_text(path.read_text().replace("delta: 1.0e-4", "delta: 1e-4"))
    out = dry_run(work)
    assert "experiment 'tiny', key delta: value '1e-4'" in out
    assert "write 1.0e-4" in out


def test_slash_in_an_experiment_name(work):
    edit(
        work / "experiments.yaml",
        lambda d: d["experiments"].update({"a/b": d["experiments"]["tiny"]}),
    )
    out = dry_run(work)
    assert "experiment name 'a/b' is not allowed" in out and "'a_b'" in out
    assert "MissingInputException" not in out


def test_image_folder_with_allow_network(work, tmp_path):
    def change(doc):
        doc["datasets"]["fashion_mnist_tiny"] = {
            "source": "image_folder",
            "path": str(tmp_path / "no_such_folder"),
            "allow_network": True,
        }

    edit(work / "config.yaml", change)
    out = dry_run(work)
    assert "'allow_network' is not an option here" in out
    assert "never uses the network" in out
    assert "ValidationError" not in out


def test_missing_image_folder_names_the_path_not_allow_network(work, tmp_path):
    def change(doc):
        doc["datasets"]["fashion_mnist_tiny"] = {
            "source": "image_folder",
            "path": str(tmp_path / "no_such_folder"),
        }

    edit(work / "config.yaml", change)
    out = dry_run(work)
    assert "datasets.fashion_mnist_tiny.path: folder" in out and "no_such_folder" in out
    assert "allow_network" not in out


def test_delta_not_below_one_over_n_from_the_idx_header(work):
    """N is not in the config (no max_train_examples): it is read from the IDX header."""
    edit(work / "config.yaml", lambda d: d["datasets"]["fashion_mnist_tiny"].update(
        max_train_examples=None))  # fmt: skip
    out = dry_run(work)  # delta 1e-4 >= 1/60000
    assert "experiment 'tiny', key delta, dataset 'fashion_mnist_tiny'" in out
    assert "must be < 1/N = 1.67e-05 (N=60000 training examples)" in out
    assert "delta: 1.0e-6" in out
