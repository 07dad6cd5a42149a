"""Extraction resumes after SIGKILL, unsharded or sharded, and gives the same store bytes."""

import json
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

# One shard job, as the extract_shard rule runs it (init is done by the parent test).
SHARD_SCRIPT = textwrap.dedent(
    """
    import sys, json
    from pipeline_lib.data import load_dataset
    from pipeline_lib.features import extract
    data = load_dataset("fashion_mnist", "train", max_examples={n})
    settings = extract.ExtractionSettings(batch_size=32, chunk_rows={rows})
    out = extract.extract_shard(data, backbone_name="efficientnet_lite0", image_size=32,
                                settings=settings, out_path=sys.argv[1],
                                shard=int(sys.argv[2]), num_shards=int(sys.argv[3]))
    print(json.dumps(out))
    """
).format(n=N, rows=ROWS)


def _run(*args, script=SCRIPT) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _kill_after(args, script, path, chunks_in_range, min_done=3):
    """Start the script, SIGKILL it once `min_done` of `chunks_in_range` have markers."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    done_dir = fs.work_dir(path) / "done"
    names = {f"chunk-{c:06d}" for c in chunks_in_range}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.exists() and len(names & {p.name for p in done_dir.iterdir()}) >= min_done:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    clean = tmp_path_factory.mktemp("clean") / "train.zarr"
    _run(clean)
    return clean


def test_sigkill_then_resume_is_bit_identical(tmp_path, clean_store, assert_same_store):
    total = fs.num_chunks(N, ROWS)
    killed = tmp_path / "killed" / "train.zarr"
    _kill_after([killed], SCRIPT, killed, range(total))
    assert not killed.exists()  # nothing published
    finished_before = total - len(fs.pending_chunks(killed))
    assert 3 <= finished_before < total

    stats = _run(killed)
    assert stats["chunks_done"] == total - finished_before  # no finished chunk recomputed
    assert_same_store(killed, clean_store)
    x, y = fs.FeatureStore(killed).read_all()
    assert x.shape == (N, 1280) and np.isfinite(x).all() and y.shape == (N,)


def test_killed_shard_resumes_to_identical_bytes(tmp_path, clean_store, assert_same_store):
    from pipeline_lib.data import load_dataset
    from pipeline_lib.features import extract

    data = load_dataset("fashion_mnist", "train", max_examples=N)
    settings = extract.ExtractionSettings(batch_size=32, chunk_rows=ROWS)
    path = tmp_path / "sharded" / "train.zarr"
    extract.init_store(
        data, backbone_name="efficientnet_lite0", out_path=path, image_size=32, settings=settings
    )
    total = fs.num_chunks(N, ROWS)
    mine = fs.shard_chunks(total, 2, 1)
    _kill_after([path, 1, 2], SHARD_SCRIPT, path, mine)
    pending = fs.pending_chunks(path)
    assert set(range(mine.start)) <= set(pending)  # the killed shard touched only its chunks
    left = [c for c in pending if c in mine]
    assert 0 < len(left) <= len(mine) - 3

    resumed = _run(path, 1, 2, script=SHARD_SCRIPT)
    assert resumed["chunks_done"] == len(left)  # only the unfinished chunks were computed
    assert resumed["chunks_already_done"] == len(mine) - len(left)
    first = _run(path, 0, 2, script=SHARD_SCRIPT)
    assert first["chunks_done"] == len(range(mine.start))
    extract.finalize_extraction(path, [first, resumed])
    assert_same_store(path, clean_store)
