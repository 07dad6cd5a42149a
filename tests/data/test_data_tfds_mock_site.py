"""tests/workflow/tfds_mock/sitecustomize.py: mocked TFDS in subprocesses, deterministically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow_datasets")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MOCK_SITE = ROOT / "tests" / "workflow" / "tfds_mock"

# Opens both splits the way extraction does, reading in a background thread.
SCRIPT = """
import hashlib, json, sys, threading
from pipeline_lib.data import DatasetUnavailableError, open_dataset

spec = {"source": "tfds", "tfds_name": sys.argv[2], "data_dir": sys.argv[1]}
result = {}
try:
    for split in ("train", "test"):
        data = open_dataset("mocked", spec, split)
        box = []
        reader = threading.Thread(target=lambda: box.append(data.read(0, data.num_examples)))
        reader.start()
        reader.join()
        images, labels = box[0]
        blob = b"".join(image.tobytes() for image in images)
        result[split] = {
            "n": data.num_examples,
            "k": data.num_classes,
            "sha": hashlib.sha256(blob).hexdigest(),
            "labels": labels.tolist(),
        }
except DatasetUnavailableError as exc:
    result = {"unavailable": str(exc)}
print(json.dumps(result))
"""


def _run(data_dir: Path, tfds_name: str = "cifar10", mock: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "DP_TEST_MOCK_TFDS"}
    env["PYTHONPATH"] = os.pathsep.join([str(MOCK_SITE), str(ROOT)])
    if mock is not None:
        env["DP_TEST_MOCK_TFDS"] = mock
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(data_dir), tfds_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mocked_counts_and_same_data_in_two_processes(tmp_path):
    first = _json(_run(tmp_path, mock="6"))
    second = _json(_run(tmp_path, mock="6"))
    assert first["train"]["n"] == first["test"]["n"] == 6
    assert first["train"]["k"] == 10
    assert all(0 <= label < 10 for label in first["train"]["labels"])
    assert first == second  # same images and labels in separate processes
    assert list(tmp_path.iterdir()) == []  # the mock writes nothing


def test_variable_size_dataset_is_deterministic_too(tmp_path):
    first = _json(_run(tmp_path, "imagenet2012", mock="3"))
    assert first["train"]["n"] == 3 and first["train"]["k"] == 1000
    assert first == _json(_run(tmp_path, "imagenet2012", mock="3"))


def test_without_the_variable_nothing_is_mocked(tmp_path):
    result = _json(_run(tmp_path))
    assert "unavailable" in result
    assert f"no prepared data at {tmp_path / 'cifar10'}" in result["unavailable"]
    assert "unavailable" in _json(_run(tmp_path, mock=""))


def test_a_bad_value_stops_the_interpreter(tmp_path):
    proc = _run(tmp_path, mock="lots")
    assert proc.returncode != 0
    assert "DP_TEST_MOCK_TFDS='lots' must be a positive number of examples" in proc.stderr
