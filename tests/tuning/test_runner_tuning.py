"""run_head end to end on small synthetic stores: untuned, private and public selection."""

import json

import numpy as np
import pytest

from pipeline_lib import experiments as xp
from pipeline_lib.features import store as fs
from pipeline_lib.features.split import RowSubset
from pipeline_lib.heads.stats import compute_stats, save_stats
from pipeline_lib.runner import run_head

K, D = 3, 8


def _store(path, n, seed):
    centers = np.random.default_rng(12345).normal(size=(K, D)) * 3  # one task for all stores
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, D))).astype(np.float32)
    attrs = {
        "backbone": "synthetic",
        "checkpoint_sha256": "0" * 64,
        "preprocessing": "none",
        "image_size": 16,
        "dataset": path.parent.name,
        "split": path.stem,
        "num_classes": K,
    }
    fs.create_store(path, num_examples=n, feature_dim=D, chunk_rows=256, attrs=attrs)
    for c in range(fs.num_chunks(n, 256)):
        a, b = fs.chunk_bounds(c, n, 256)
        fs.write_chunk(path, c, x[a:b], y[a:b])
    fs.finalize_store(path)
    return path


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


def _config(root, methods, tuning=None):
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
                import pathlib

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


def test_untuned_run_does_not_claim_tuning(stores):
    root, st = stores
    record, _ = _run(root, st, _config(root, {"dp_ls": {}}), "dp_ls")
    assert record["epsilon_covers_tuning"] is False
    assert record["per_run_epsilon"] == record["spent_epsilon"] <= 2.0
    assert "Not covered: hyperparameter choices" in record["privacy_statement"]
    assert record["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "method,grid",
    [("dp_ls", {"ridge_noise_factor": [0.05, 1.0, 4.0]}), ("dp_fc", {"num_steps": [1, 3]})],
)
def test_private_selection_composes_everything(stores, method, grid):
    root, st = stores
    cfg = _config(root, {method: grid}, {"selection": "private", "validation_fraction": 0.2})
    record, out = _run(root, st, cfg, method)
    assert record["epsilon_covers_tuning"] is True
    assert record["spent_epsilon"] <= 2.0 and record["spent_epsilon"] > 0.99 * 2.0
    assert record["per_run_epsilon"] < record["spent_epsilon"]
    tuning = record["tuning"]
    assert tuning["num_candidates"] == len(next(iter(grid.values())))
    assert all(c["epsilon_alone"] < 2.0 for c in tuning["candidates"])
    assert record["num_train_fit"] + round(0.2 * 3000) == pytest.approx(3000, abs=60)
    # the released event is the composition of all candidates and the selection
    assert record["dp_event_json"]["type"] == "ComposedDpEvent"
    assert len(record["dp_event_json"]["events"]) == tuning["num_candidates"] + 1
    assert record["test_accuracy"] > 0.7
    saved = json.loads(open(out["metrics"]).read())
    assert saved["tuning"]["selected"] == tuning["selected"]


def test_public_selection_pays_for_one_private_run(stores):
    root, st = stores
    cfg = _config(
        root,
        {"dp_ls": {"ridge_noise_factor": [0.05, 4.0]}},
        {"selection": "public", "public_dataset": "pub"},
    )
    record, _ = _run(root, st, cfg, "dp_ls")
    assert record["epsilon_covers_tuning"] is True
    assert record["per_run_epsilon"] == record["spent_epsilon"] <= 2.0
    accs = [c["public_test_accuracy"] for c in record["tuning"]["candidates"]]
    assert record["tuning"]["selected"] == int(np.argmax(accs))
    assert "public dataset 'pub'" in record["privacy_statement"]
    assert record["dp_event_json"]["type"] == "ComposedDpEvent"  # dp_ls alone: 2 Gaussians
    assert len(record["dp_event_json"]["events"]) == 2
