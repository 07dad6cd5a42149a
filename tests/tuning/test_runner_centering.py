"""run_head with private feature centring (center: true): the event, the share and mu~ are
recorded, head.npz carries mu~ and the released head applies it; without the option a
reproducible run is exactly the plain head's."""

import json

import dp_accounting
import numpy as np
import pytest

from pipeline_lib.features.centered import CenteredRows
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads import make_head
from pipeline_lib.heads.linear import num_correct, predict_logits
from pipeline_lib.heads.released import load_head
from pipeline_lib.heads.stats import compute_stats
from pipeline_lib.privacy import accounting, centering, noise
from pipeline_lib.privacy.events import event_from_json
from pipeline_lib.runner import run_identity
from tests.store_helpers import write_array_store

REPRO = {"mode": "reproducible", "seed": 0}


def _offset_store(path, n, seed):
    """Like backbone features: all positive, a large common mean and overlapping classes,
    so that centring changes the predictions (the shared stores are separable either way)."""
    k, d = 3, 8
    centers = np.random.default_rng(7).normal(size=(k, d))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int32)
    x = np.abs(6.0 + centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return write_array_store(path, x, y, num_classes=k, dataset="priv")


@pytest.fixture(scope="module")
def offset_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("centring")
    (root / "priv").mkdir()
    train = _offset_store(root / "priv" / "train.zarr", 3000, 0)
    return root, {"priv": (train, _offset_store(root / "priv" / "test.zarr", 600, 1))}


@pytest.mark.parametrize(
    "method,hp",
    [
        ("dp_ls", {}),
        ("dp_fc", {"num_steps": 3}),
        ("dp_newton", {"num_steps": 2}),
        ("dp_sgd", {"batch_size": 512, "epochs": 1}),
    ],
)
def test_centred_run_records_and_applies_the_released_mean(
    offset_stores, make_config, run_method, method, hp
):
    root, st = offset_stores
    cfg = make_config(root, {method: {**hp, "center": True}})
    record, out = run_method(root, st, cfg, method)
    fc = record["feature_center"]
    assert fc["share"] == centering.DEFAULT_SHARE
    assert record["hyperparameters"]["center"] is True
    event = event_from_json(record["dp_event_json"])
    assert isinstance(event, dp_accounting.ComposedDpEvent)
    assert event.events[0] == dp_accounting.GaussianDpEvent(fc["noise_multiplier"])
    assert record["noise_multipliers"]["center"] == fc["noise_multiplier"]
    assert record["spent_epsilon"] == accounting.epsilon_of(event, 1e-5, "pld") <= 2.0
    assert "noisy mean of the bounded training features" in record["privacy_statement"]
    with np.load(out["head"]) as z:
        np.testing.assert_array_equal(z["center"], np.asarray(fc["mean"], np.float32))
    # The released head centres new features by mu~: its predictions on the raw test
    # features give exactly the runner's test accuracy, which uncentred rows do not.
    head = load_head(out["head"])
    test = FeatureStore(st["priv"][1])
    x, y = test.read_all()
    assert np.mean(head.predict(x) == y) == record["test_accuracy"]
    bounds = dict(l2_clip_norm=1.0, transform="normalize")
    centred = CenteredRows(test, head.center, **bounds)
    right = num_correct(centred, head.weights, head.bias, **bounds)
    assert right / test.num_examples == record["test_accuracy"]
    rows = np.asarray(centred.read_all()[0])
    want = np.asarray(predict_logits(head.weights, head.bias, rows, **bounds))
    np.testing.assert_allclose(head.logits(x), want, rtol=1e-4, atol=1e-4)
    raw = np.asarray(predict_logits(head.weights, head.bias, x, **bounds))
    assert not np.allclose(head.logits(x), raw, rtol=1e-2, atol=1e-3)
    # and the runner evaluated the centred rows: the raw rows score differently
    assert num_correct(test, head.weights, head.bias, **bounds) != right


def test_centred_mean_is_near_the_exact_bounded_mean(stores, make_config, run_method):
    root, st = stores
    record, _ = run_method(root, st, make_config(root, {"dp_ls": {"center": True}}), "dp_ls")
    train = FeatureStore(st["priv"][0])
    x, _ = train.read_all()
    exact = np.asarray(centering.bound_rows(x, 1.0, "normalize")).mean(0)
    fc = record["feature_center"]
    err = np.linalg.norm(np.asarray(fc["mean"]) - exact)
    expected = fc["noise_stddev_of_sum"] * np.sqrt(len(exact)) / train.num_examples
    assert err < 4 * expected  # the noise is there, at its stated scale
    assert err > 0.1 * expected


def test_centring_composes_with_private_selection(stores, make_config, run_method):
    root, st = stores
    methods = {"dp_ls": {"center": True, "ridge_noise_factor": [0.1, 1.0]}}
    tuning = {"selection": "private", "validation_fraction": 0.2}
    record, out = run_method(root, st, make_config(root, methods, tuning), "dp_ls")
    assert record["spent_epsilon"] <= 2.0 and record["epsilon_covers_tuning"]
    candidates = event_from_json(record["dp_event_json"]).events[:-1]
    assert len(candidates) == 2 and all(c.events[0] == candidates[0].events[0] for c in candidates)
    assert load_head(out["head"]).center is not None


def test_reproducible_run_without_the_option_is_the_plain_head(stores, make_config, run_method):
    root, st = stores
    cfg = make_config(root, {"dp_ls": {}}, noise=REPRO)
    record, out = run_method(root, st, cfg, "dp_ls")
    assert "feature_center" not in record and "center" not in record["hyperparameters"]
    train = FeatureStore(st["priv"][0])
    head = make_head("dp_ls", {}).calibrate(epsilon=2.0, delta=1e-5, num_examples=3000)
    assert event_from_json(record["dp_event_json"]) == head.dp_event()
    from pipeline_lib import experiments as xp

    run = next(r for r in xp.expand_runs(cfg) if r["method"] == "dp_ls")
    key = noise.key_for_run(REPRO, run_identity(run))
    want = head.fit(compute_stats(train, l2_clip_norm=1.0, transform="normalize"), key=key)
    with np.load(out["head"]) as z:
        assert "center" not in z.files
        np.testing.assert_array_equal(z["weights"], want["weights"])
        np.testing.assert_array_equal(z["bias"], want["bias"])
    assert json.loads(open(out["metrics"]).read())["noise"]["mode"] == "reproducible"
