"""Classify with a released head: the README command, the metrics.json accuracy to the label,
class names in head.npz, and a refused checkpoint."""

import csv
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib import experiments as xp
from pipeline_lib.classify import ClassifyError, classify
from pipeline_lib.data.sources import FASHION_MNIST_CLASS_NAMES
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads.released import load_head
from pipeline_lib.run_outputs import write_run_outputs

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.slow

CONFIG = {
    "results_dir": "results",
    "datasets": {
        "fm_tiny": {
            "source": "fashion_mnist",
            "data_dir": str(FMNIST),
            "max_train_examples": 300,
            "max_test_examples": 150,
        }
    },
    "extraction": {"batch_size": 32, "chunk_rows": 64},
    "experiments": {
        "t": {
            "dataset": "fm_tiny",
            "backbone": "efficientnet_lite0",
            "image_size": 32,
            "epsilons": [1],
            "delta": 1.0e-3,
            "seeds": [0],
            "baselines": {"nonprivate_logistic": {"epochs": 10, "batch_size": 64}},
        }
    },
}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny feature store pair and a head released from it by the workflow's runner."""
    if not FMNIST.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    from pipeline_lib.data import open_dataset
    from pipeline_lib.features.extract import extract_to_store
    from pipeline_lib.runner import run_head

    work = tmp_path_factory.mktemp("classify")
    (spec,) = xp.expand_runs(CONFIG)
    stores = {}
    for split in ("train", "test"):
        stores[split] = work / f"{split}.zarr"
        extract_to_store(
            open_dataset("fm_tiny", CONFIG["datasets"]["fm_tiny"], split),
            backbone_name="efficientnet_lite0",
            out_path=stores[split],
            image_size=32,
            batch_size=32,
            chunk_rows=64,
            progress=False,
        )
    head = work / "run" / "head.npz"
    metrics = run_head(
        spec,
        train_store=stores["train"],
        test_store=stores["test"],
        metrics_path=head.with_name("metrics.json"),
        head_path=head,
    )
    return work, head, metrics


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_head_stores_class_names_and_feature_provenance(released):
    _, head_path, metrics = released
    head = load_head(head_path)
    assert head.class_names == list(FASHION_MNIST_CLASS_NAMES)
    feats = head.metadata["features"]
    assert feats["backbone"] == "efficientnet_lite0" and feats["image_size"] == 32
    assert len(feats["checkpoint_sha256"]) == 64
    assert "to 32px" in feats["preprocessing"]
    assert (feats["batch_size"], feats["chunk_rows"]) == (32, 64)
    assert metrics["class_names"] == list(FASHION_MNIST_CLASS_NAMES)


def test_dataset_split_reproduces_the_metrics_accuracy_to_the_label(released, tmp_path):
    _, head_path, metrics = released
    out = tmp_path / "preds.csv"
    summary = classify(head_path, out=out, dataset="fm_tiny", split="test", config=CONFIG)
    assert summary["num_images"] == 150
    assert summary["accuracy"] == metrics["test_accuracy"]  # exactly: same labels
    assert summary["accuracy"] > 0.3  # chance is 0.1; the head is not a constant
    rows = read_csv(out)
    assert list(rows[0]) == ["file", "label_name", "label_index", "score"]
    assert rows[0]["file"] == "fm_tiny/test/0"
    for row in rows:
        assert row["label_name"] == FASHION_MNIST_CLASS_NAMES[int(row["label_index"])]
        float(row["score"])


def _readme_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Classifying new images") :]
    line = next(s for s in section.splitlines() if s.startswith("python -m pipeline_lib.classify"))
    return shlex.split(line)


def test_readme_command_on_a_folder_of_pngs(released, tmp_path):
    """The README's command, as printed, on the test split exported to PNG files (in test
    order, in folders named by class index): same labels as the dataset route, same accuracy."""
    from PIL import Image

    from pipeline_lib.data import load_dataset

    _, head_path, metrics = released
    test = load_dataset("fashion_mnist", "test", data_dir=FMNIST, max_examples=150)
    folder = tmp_path / "my_images"
    for i, (image, label) in enumerate(zip(test.images, test.labels, strict=True)):
        (folder / f"{i:05d}").mkdir(parents=True)  # one folder per image keeps test order
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}" / f"{label}.png")
    cmd = _readme_command()
    assert cmd[:3] == ["python", "-m", "pipeline_lib.classify"]
    args = cmd[3:]
    args[args.index("--head") + 1] = str(head_path)
    args[args.index("--images") + 1] = str(folder)
    args[args.index("--out") + 1] = str(tmp_path / "predictions.csv")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_lib.classify", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr  # resized exactly as in training
    rows = read_csv(tmp_path / "predictions.csv")
    assert [Path(r["file"]).parent.name for r in rows] == [f"{i:05d}" for i in range(150)]
    predicted = np.array([int(r["label_index"]) for r in rows])
    by_dataset = tmp_path / "by_dataset.csv"
    classify(head_path, out=by_dataset, dataset="fm_tiny", split="test", config=CONFIG)
    assert predicted.tolist() == [int(r["label_index"]) for r in read_csv(by_dataset)]
    assert np.mean(predicted == test.labels) == metrics["test_accuracy"]
    assert f"the run's test accuracy was {metrics['test_accuracy']:.4f}" in proc.stdout


def test_a_centred_private_head_is_applied_to_new_images_as_in_training(released, tmp_path):
    """center: true (private feature centring): classify centres new features by the
    released mean in head.npz, so it reproduces the run's test accuracy to the label."""
    from pipeline_lib.runner import run_head

    work, _, _ = released
    cfg = json.loads(json.dumps(CONFIG))
    exp = cfg["experiments"]["t"]
    exp.pop("baselines")
    exp["methods"] = {"dp_ls": {"center": True}}
    exp["noise"] = {"mode": "reproducible", "seed": 0}
    (spec,) = xp.expand_runs(cfg)
    head_path = tmp_path / "run" / "head.npz"
    metrics = run_head(
        spec,
        train_store=work / "train.zarr",
        test_store=work / "test.zarr",
        metrics_path=head_path.with_name("metrics.json"),
        head_path=head_path,
    )
    head = load_head(head_path)
    assert head.center is not None and metrics["feature_center"]["share"] == 0.02
    summary = classify(head_path, out=tmp_path / "p.csv", dataset="fm_tiny", config=cfg)
    assert summary["accuracy"] == metrics["test_accuracy"]
    uncentred = dataclasses.replace(head, center=None)
    x = FeatureStore(work / "test.zarr").read_all()[0]
    assert not np.array_equal(uncentred.logits(x), head.logits(x))


def test_folders_named_by_class_give_an_accuracy(released, tmp_path):
    from PIL import Image

    _, head_path, _ = released
    rng = np.random.default_rng(0)
    for name in ("Trouser", "7"):
        (tmp_path / name).mkdir()
        Image.fromarray(rng.integers(0, 255, (28, 28), np.uint8), "L").save(
            tmp_path / name / "a.png"
        )
    summary = classify(head_path, out=tmp_path / "p.csv", images=[tmp_path], config=CONFIG)
    assert summary["num_images"] == 2 and 0 <= summary["num_correct"] <= 2


def test_a_different_checkpoint_is_refused(released, tmp_path):
    _, head_path, _ = released
    with np.load(head_path) as z:
        weights, bias, metadata = z["weights"], z["bias"], json.loads(str(z["metadata"]))
    metadata["features"]["checkpoint_sha256"] = "0" * 64
    other = tmp_path / "head.npz"
    params = {"weights": weights, "bias": bias}
    write_run_outputs(other, tmp_path / "metrics.json", params, metadata)  # intact, checksummed
    with pytest.raises(ClassifyError, match=r"checkpoint has sha256 [0-9a-f]{64}, but the head"):
        classify(other, out=tmp_path / "p.csv", dataset="fm_tiny", config=CONFIG)
    assert not (tmp_path / "p.csv").exists()

    del metadata["features"]
    write_run_outputs(other, tmp_path / "metrics.json", params, metadata)
    with pytest.raises(ClassifyError, match="does not record how its features were made"):
        classify(other, out=tmp_path / "p.csv", dataset="fm_tiny", config=CONFIG)


def test_tta_must_match_and_combinations_are_refused(released, tmp_path):
    _, head_path, _ = released
    with np.load(head_path) as z:
        weights, bias, metadata = z["weights"], z["bias"], json.loads(str(z["metadata"]))
    other = tmp_path / "head.npz"
    params = {"weights": weights, "bias": bias}
    metadata["features"]["tta"] = "flip"  # trained with TTA; the config's entry has none
    write_run_outputs(other, tmp_path / "metrics.json", params, metadata)
    with pytest.raises(ClassifyError, match="tta='flip', but the config's entry gives"):
        classify(other, out=tmp_path / "p.csv", dataset="fm_tiny", config=CONFIG)
    metadata["features"]["sources"] = [
        {"backbone": "efficientnet_lite0", "image_size": 32},
        {"backbone": "scatternet", "image_size": 28},
    ]
    write_run_outputs(other, tmp_path / "metrics.json", params, metadata)
    with pytest.raises(ClassifyError, match="efficientnet_lite0@32, scatternet@28"):
        classify(other, out=tmp_path / "p.csv", dataset="fm_tiny", config=CONFIG)
    assert not (tmp_path / "p.csv").exists()


def test_command_line_errors_are_for_people(released, tmp_path):
    _, head_path, _ = released
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_lib.classify", "--head", str(head_path),
         "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "nowhere: no such file or folder" in proc.stderr


def test_checkpoint_sha256_of_a_config_defined_vit_reads_only_the_file(tmp_path):
    import hashlib

    from pipeline_lib.classify import checkpoint_sha256

    path = tmp_path / "vit.npz"
    path.write_bytes(b"not even an npz: only its digest is read")
    spec = {"model": "vit", "variant": "tiny/4", "checkpoint": str(path)}
    assert (
        checkpoint_sha256("my_vit", {"spec": spec}) == hashlib.sha256(path.read_bytes()).hexdigest()
    )
