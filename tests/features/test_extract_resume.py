"""Extraction resumes after SIGKILL and gives a bit-identical store."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.features import store as fs

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FMNIST.exists(), reason="needs apt-get install dataset-fashion-mnist"),
]
N, ROWS = 3000, 64

SCRIPT = textwrap.dedent(
    """
    import sys, json
    from pipeline_lib.data import load_dataset
    from pipeline_lib.features.extract import extract_to_store
    data = load_dataset("fashion_mnist", "train", max_examples={n})
    out = extract_to_store(data, backbone_name="efficientnet_lite0", out_path=sys.argv[1],
                           image_size=32, batch_size=32, chunk_rows={rows}, progress=False)
    print(json.dumps(out))
    """
).format(n=N, rows=ROWS)


def _run(path):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, check=True
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    total = fs.num_chunks(N, ROWS)
    killed = tmp_path / "killed" / "train.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(killed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    done_dir = fs.work_dir(killed) / "done"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        n_done = len(list(done_dir.glob("chunk-*"))) if done_dir.exists() else 0
        if n_done >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    assert not killed.exists()  # nothing published
    finished_before = total - len(fs.pending_chunks(killed))
    assert 3 <= finished_before < total

    resumed = _run(killed)
    import json

    stats = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert stats["chunks_done"] == total - finished_before  # no finished chunk recomputed

    clean = tmp_path / "clean" / "train.zarr"
    _run(clean)
    a, b = _files(killed), _files(clean)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    x, y = fs.FeatureStore(killed).read_all()
    assert x.shape == (N, 1280) and np.isfinite(x).all() and y.shape == (N,)
