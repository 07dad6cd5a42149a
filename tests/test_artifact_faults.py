"""Fault injection on the artifacts read back after extraction: one row per (artifact, fault).

Artifacts: the cached statistics (.npz), a run's head.npz and metrics.json, and a
cached checkpoint. Faults: delete, truncate, flip one byte, swap with the same
file from another run. Each row checks that the error names the file and the
fault, that nothing downstream is written, and that after the documented repair
the outputs equal an undisturbed run's. (Feature stores: tests/features/test_store_faults.py.)
"""

import csv
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib import experiments as xp
from pipeline_lib import integrity
from pipeline_lib.backbones.checkpoints import CheckpointError, cache_path, fetch_checkpoint
from pipeline_lib.features import store as fs
from pipeline_lib.heads.released import load_head
from pipeline_lib.heads.stats import compute_stats, load_stats, save_stats, stats_repair_command
from pipeline_lib.reporting import build_report
from pipeline_lib.run_outputs import head_repair_command, verify_runs
from pipeline_lib.runner import run_head
from tests.store_helpers import write_array_store

K, D, N = 3, 8, 600
FAULTS = ["delete", "truncate", "flip", "swap"]


def _store(path: Path, seed: int) -> Path:
    centers = np.random.default_rng(12345).normal(size=(K, D)) * 3
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, N).astype(np.int32)
    x = (centers[y] + rng.normal(size=(N, D))).astype(np.float32)
    return write_array_store(path, x, y, num_classes=K, dataset="toy")


class _Run:
    """One workflow run (results dir) of a non-private ridge head, step by step."""

    def __init__(self, root: Path, stores: tuple[Path, Path]):
        self.root, (self.train, self.test) = root, stores
        exp = dict(
            dataset="toy",
            backbone="efficientnet_lite0",
            image_size=16,
            epsilons=[1.0],
            delta=1e-5,
            seeds=[0],
            methods={},
            baselines={"nonprivate_ridge": {}},
        )
        self.cfg = {
            "results_dir": str(root / "results"),
            "datasets": {"toy": {"source": "fashion_mnist"}},
            "experiments": {"e": exp},
        }
        self.spec = next(r for r in xp.expand_runs(self.cfg) if r["method"] == "nonprivate_ridge")
        cand = self.spec["candidates"][0]
        self.stats = Path(cand["stats_file"])
        self.bounds = dict(l2_clip_norm=cand["l2_clip_norm"], transform=cand["transform"])
        out = xp.run_outputs(self.cfg, self.spec)
        self.metrics, self.head = Path(out["metrics"]), Path(out["head"])
        self.report = root / "results" / "reports" / "e"

    def compute_stats(self):  # rule compute_stats
        self.stats.parent.mkdir(parents=True, exist_ok=True)
        save_stats(compute_stats(fs.FeatureStore(self.train), **self.bounds), self.stats)

    def fit(self):  # rule fit_head
        return run_head(
            self.spec,
            train_store=self.train,
            test_store=self.test,
            metrics_path=self.metrics,
            head_path=self.head,
        )

    def build_report(self):  # rule report_experiment (its adapter verifies first)
        verify_runs([self.metrics])
        build_report([self.metrics], xp.report_files(self.cfg, "e"), title="e")

    def all(self):
        self.compute_stats()
        self.fit()
        self.build_report()
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An undisturbed run, and another run (other data) to swap files in from."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, seed in (("clean", 0), ("other", 1)):
        d = root / name
        d.mkdir()
        stores = (_store(d / "train.zarr", seed), _store(d / "test.zarr", seed + 10))
        out[name] = _Run(d, stores).all()
    return out


def _fresh(tmp_path: Path, runs) -> _Run:
    """A copy of the clean run's results and stores, to damage."""
    shutil.copytree(runs["clean"].root, tmp_path / "run")
    return _Run(tmp_path / "run", (tmp_path / "run/train.zarr", tmp_path / "run/test.zarr"))


def _same_head(a: Path, b: Path) -> None:
    ha, hb = load_head(a), load_head(b)
    np.testing.assert_array_equal(ha.weights, hb.weights)
    np.testing.assert_array_equal(ha.bias, hb.bias)


def _check_error(err: integrity.IntegrityError, path: Path, named: str, repair: str) -> str:
    msg = str(err)
    assert str(path) in msg, msg
    assert err.fault in named.split("|") and f": {err.fault}: " in msg, msg
    assert "It was not used" in msg and f"Repair: {repair}" in msg, msg
    return msg


STATS_FAULTS = {
    "delete": "missing",
    "truncate": "unreadable",
    "flip": "checksum|unreadable",
    "swap": "mismatch",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_stats_cache_fault(inject_fault, tmp_path, runs, fault):
    run = _fresh(tmp_path, runs)
    run.metrics.unlink()
    run.head.unlink()
    inject_fault(fault, run.stats, runs["other"].stats)
    with pytest.raises(integrity.IntegrityError) as info:
        run.fit()
    msg = _check_error(info.value, run.stats, STATS_FAULTS[fault], stats_repair_command(run.stats))
    print(f"\nstats cache x {fault}: {msg}")
    assert not run.metrics.exists() and not run.head.exists()  # nothing downstream
    # The repair: delete it; the workflow recomputes it and refits what used it.
    run.stats.unlink(missing_ok=True)
    run.compute_stats()
    load_stats(run.stats, data=fs.FeatureStore(run.train))
    run.fit()
    _same_head(run.head, runs["clean"].head)


def test_stats_of_another_bound_are_refused(tmp_path, runs):
    """Same data, intact file, but computed with another clipping: not usable either."""
    run = _fresh(tmp_path, runs)
    run.metrics.unlink()
    run.head.unlink()
    stats = compute_stats(fs.FeatureStore(run.train), l2_clip_norm=5.0, transform="clip")
    save_stats(stats, run.stats)
    with pytest.raises(ValueError, match="statistics were computed with l2_clip_norm=5.0"):
        run.fit()
    assert not run.metrics.exists() and not run.head.exists()


HEAD_FAULTS = {
    "delete": "missing",
    "truncate": "unreadable",
    "flip": "checksum|unreadable",
    "swap": "mismatch",
}


def _summary_without_timings(report) -> list[dict]:
    """summary.csv rows without the wall-time column (timings differ between two fits)."""
    with open(report / "summary.csv", newline="") as f:
        return [
            {k: v for k, v in row.items() if k != "median_wall_time_s"} for row in csv.DictReader(f)
        ]


@pytest.mark.parametrize("name", ["head.npz", "metrics.json"])
@pytest.mark.parametrize("fault", FAULTS)
def test_run_output_fault(inject_fault, tmp_path, runs, fault, name):
    run = _fresh(tmp_path, runs)
    shutil.rmtree(run.report)
    target = run.head if name == "head.npz" else run.metrics
    other = runs["other"].head if name == "head.npz" else runs["other"].metrics
    inject_fault(fault, target, other)
    with pytest.raises(integrity.IntegrityError) as info:
        run.build_report()
    named = HEAD_FAULTS[fault] if name == "head.npz" else "missing|unreadable|checksum|mismatch"
    # a swapped metrics.json is self-consistent: the pair is named, at the head
    at = run.head if (name, fault) == ("metrics.json", "swap") else target
    msg = _check_error(info.value, at, named, head_repair_command(run.metrics))
    if fault == "swap":
        assert str(run.metrics) in msg
    print(f"\n{name} x {fault}: {msg}")
    assert not run.report.exists()  # no report from a damaged run
    # The repair: delete both files; the workflow refits that run and reports again.
    run.head.unlink(missing_ok=True)
    run.metrics.unlink(missing_ok=True)
    record = run.fit()
    run.build_report()
    _same_head(run.head, runs["clean"].head)
    clean = json.loads(runs["clean"].metrics.read_text())
    assert record["test_accuracy"] == clean["test_accuracy"]
    assert _summary_without_timings(run.report) == _summary_without_timings(runs["clean"].report)


# --- cached checkpoints -------------------------------------------------------------


class _Server:
    """Serves one payload at /ckpt.npz on localhost; the payload can be changed."""

    def __init__(self, payload: bytes):
        self.payload = payload
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                self.wfile.write(outer.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ckpt.npz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server(np.random.default_rng(0).bytes(4096))
    yield s
    s.close()


CKPT_FAULTS = {"delete": "missing", "truncate": "size", "flip": "checksum", "swap": "size|checksum"}


@pytest.mark.parametrize("fault", FAULTS)
def test_cached_checkpoint_fault(inject_fault, tmp_path, server, fault):
    clean = server.payload
    path, sha = fetch_checkpoint(server.url, cache_dir=tmp_path / "a", allow_network=True)
    server.payload = np.random.default_rng(1).bytes(3000)  # another run got other bytes
    other, _ = fetch_checkpoint(server.url, cache_dir=tmp_path / "b", allow_network=True)
    server.payload = clean
    inject_fault(fault, Path(path), Path(other))
    with pytest.raises(CheckpointError) as info:
        fetch_checkpoint(server.url, cache_dir=tmp_path / "a")  # network off: nothing fetched
    msg = str(info.value)
    print(f"\ncached checkpoint x {fault}: {msg}")
    assert path in msg and any(f": {f}: " in msg for f in CKPT_FAULTS[fault].split("|")), msg
    assert "It was not used" in msg and "allow_network: true" in msg
    assert not Path(path).exists()  # the damaged copy can never be used later
    # The repair: rerun with network access; it is downloaded again.
    again, sha2 = fetch_checkpoint(server.url, cache_dir=tmp_path / "a", allow_network=True)
    assert (again, sha2) == (path, sha) and Path(path).read_bytes() == clean
    assert cache_path(server.url, tmp_path / "a") == path
