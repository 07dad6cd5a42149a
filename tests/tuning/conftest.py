"""Small synthetic feature stores and a one-call run_head for the runner tests."""

import pathlib

import numpy as np
import pytest

from pipeline_lib import experiments as xp
from pipeline_lib.features import store as fs
from pipeline_lib.features.split import RowSubset
from pipeline_lib.heads.stats import compute_stats, save_stats
from pipeline_lib.runner import run_head
from tests.store_helpers import write_array_store

K, D = 3, 8


def _store(path, n, seed):
    centers = np.random.default_rng(12345).normal(size=(K, D)) * 3  # one task for all stores
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, D))).astype(np.float32)
    return write_array_store(path, x, y, num_classes=K, dataset=path.parent.name)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    out = {}
    for name, seed in (("priv", 0), ("pub", 1)):
        (root / name).mkdir()
        out[name] = (
            _store(root / name / "train.zarr", 3000, seed),
            _store(root / name / "test.zarr", 600, seed + 10),
        )
    return root, out


def _config(root, methods, tuning=None, **exp_extra):
    exp = {
        "dataset": "priv",
        "backbone": "efficientnet_lite0",
        "image_size": 16,
        "epsilons": [2.0],
        "delta": 1e-5,
        "seeds": [0],
        "methods": methods,
    }
    if tuning:
        exp["tuning"] = tuning
    exp.update(exp_extra)
    return {
        "results_dir": str(root / "results"),
        "datasets": {"priv": {"source": "fashion_mnist"}, "pub": {"source": "fashion_mnist"}},
        "experiments": {"e": exp},
    }


def _run(root, stores, cfg, method):
    run = next(r for r in xp.expand_runs(cfg) if r["method"] == method)
    for cand in run["candidates"]:
        for key, ds, part in (
            ("stats_file", "priv", run["part"]),
            ("public_stats_file", "pub", "all"),
            ("final_stats_file", "priv", "all"),
        ):
            path = cand.get(key)
            if path:
                data = fs.FeatureStore(stores[ds][0])
                if part != "all":
                    data = RowSubset(data, part="fit", fraction=float(part[3:]))
                kw = dict(l2_clip_norm=cand["l2_clip_norm"], transform=cand["transform"])
                pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
                save_stats(compute_stats(data, **kw), path)
    out = xp.run_outputs(cfg, run)
    pub = (
        stores["pub"] if run["tuning"] and run["tuning"]["selection"] == "public" else (None, None)
    )
    return run_head(
        run,
        train_store=stores["priv"][0],
        test_store=stores["priv"][1],
        metrics_path=out["metrics"],
        head_path=out["head"],
        public_train_store=pub[0],
        public_test_store=pub[1],
    ), out


@pytest.fixture
def make_config():
    return _config


@pytest.fixture
def run_method():
    return _run
