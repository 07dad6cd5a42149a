"""The warm-process entry point of rule fit_head: cached stores are never stale, each run
keeps its own secret noise, calibration memoisation is exact, and job logs do not mix."""

import json
import logging
import threading

import numpy as np
import pytest

from pipeline_lib import experiments as xp
from pipeline_lib import sweep
from pipeline_lib.features import store as fs
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads import make_head
from pipeline_lib.runner import run_head
from tests.store_helpers import write_array_store

K, D, ROWS = 3, 8, 256


def _store(path, n, seed, shift=0.0):
    centers = np.random.default_rng(12345).normal(size=(K, D)) * 3
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, D)) + shift).astype(np.float32)
    return write_array_store(path, x, y, num_classes=K, dataset="syn", chunk_rows=ROWS)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return root, _store(root / "train.zarr", 2000, 0), _store(root / "test.zarr", 500, 1)


def test_cache_reads_once_and_rereads_a_rewritten_store(tmp_path):
    path = _store(tmp_path / "train.zarr", 600, 0)
    cache = sweep.StoreCache(budget_mb=64)
    a = cache.open(path)
    assert isinstance(a, sweep.LoadedStore) and cache.open(path) is a and cache.loads == 1
    np.testing.assert_array_equal(a.read_all()[0], FeatureStore(path).read_all()[0])
    with pytest.raises(ValueError):  # shared across runs: read-only
        a.features[0, 0] = 1.0
    fs.shutil.rmtree(path)  # the store is re-extracted with other contents
    _store(path, 600, 0, shift=5.0)
    b = cache.open(path)
    assert cache.loads == 2 and b is not a
    np.testing.assert_allclose(b.read_all()[0], a.read_all()[0] + 5.0, atol=1e-5)


def test_cache_notices_a_damaged_chunk_and_streams_big_stores(tmp_path):
    path = _store(tmp_path / "train.zarr", 600, 0)
    cache = sweep.StoreCache(budget_mb=64)
    cache.open(path)
    chunk = next(p for p in (path / "features").rglob("*") if p.is_file() and "c" in p.parts)
    chunk.write_bytes(b"garbage")  # damaged on disk after it was cached
    with pytest.raises(Exception, match="features|chunk|decode|codec|zstd|Zstd"):
        cache.open(path)
    big = _store(tmp_path / "big.zarr", 600, 1)  # over the budget: streamed, not cached
    assert isinstance(sweep.StoreCache(budget_mb=0.001).open(big), FeatureStore)


def test_calibration_memo_is_exact():
    head = make_head("dp_ls", {"l2_clip_norm": 1.0})
    direct = head.calibrate(epsilon=1.0, delta=1e-5, num_examples=2000)
    memo = sweep.calibrated(head, epsilon=1.0, delta=1e-5, num_examples=2000)
    assert memo == direct
    assert sweep.calibrated(head, epsilon=1.0, delta=1e-5, num_examples=2000) is memo
    assert sweep.calibrated(head, epsilon=2.0, delta=1e-5, num_examples=2000) != memo


def _run(root, train, test, method, noise=None, tag="a"):
    exp = dict(
        dataset="syn",
        backbone="efficientnet_lite0",
        image_size=16,
        epsilons=[2.0],
        delta=1e-5,
        seeds=[0],
        methods={method: {"num_steps": 3}},
    )
    if noise:
        exp["noise"] = noise
    cfg = {
        "results_dir": str(root / tag),
        "datasets": {"syn": {"source": "fashion_mnist"}},
        "experiments": {"e": exp},
    }
    spec = next(r for r in xp.expand_runs(cfg) if r["method"] == method)
    return spec, xp.run_outputs(cfg, spec)


def _weights(path):
    with np.load(path) as z:
        return np.concatenate([z["weights"].ravel(), z["bias"].ravel()])


def test_warm_runs_draw_new_secret_noise_and_match_cold_runs_when_reproducible(stores):
    root, train, test = stores
    inputs = {"train": str(train), "test": str(test)}
    spec, out_a = _run(root, train, test, "dp_fc", tag="a")
    _, out_b = _run(root, train, test, "dp_fc", tag="b")
    sweep.fit_run(spec, input=inputs, output=out_a)
    sweep.fit_run(spec, input=inputs, output=out_b)
    assert not np.allclose(_weights(out_a["head"]), _weights(out_b["head"]))
    assert json.loads(open(out_a["metrics"]).read())["noise"]["mode"] == "secret"

    repro = {"mode": "reproducible", "seed": 0}
    spec, warm = _run(root, train, test, "dp_fc", noise=repro, tag="warm")
    _, cold = _run(root, train, test, "dp_fc", noise=repro, tag="cold")
    sweep.fit_run(spec, input=inputs, output=warm)
    run_head(
        spec, train_store=train, test_store=test, metrics_path=cold["metrics"],
        head_path=cold["head"],
    )  # fmt: skip
    np.testing.assert_array_equal(_weights(warm["head"]), _weights(cold["head"]))
    a, b = (json.loads(open(o["metrics"]).read()) for o in (warm, cold))
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["noise_multipliers"] == b["noise_multipliers"] and a["dp_event"] == b["dp_event"]


def test_job_logs_keep_their_own_thread(tmp_path):
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    barrier = threading.Barrier(2)

    def job(i):
        with sweep.job_log(logs[i]):
            barrier.wait()
            logging.getLogger("pipeline_lib.heads").info("message of job %d", i)
            barrier.wait()

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, path in enumerate(logs):
        text = path.read_text()
        assert f"message of job {i}" in text and f"message of job {1 - i}" not in text
    ours = {str(p) for p in logs}
    left = [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", "") in ours]
    assert not left, "each job removes its handler"
