"""DP-SGD head: accounting, noise, Poisson batches, and the non-private limit."""

import dataclasses

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.heads.dp_sgd import DPSGDLogistic
from pipeline_lib.privacy import accounting
from pipeline_lib.privacy.clipping import bound_rows
from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private


def _data(n=600, d=6, k=3, seed=0, chunk_rows=128):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centers = rng.normal(size=(k, d))
    x = centers[y] + 0.6 * rng.normal(size=(n, d))
    return InMemoryFeatures(x, y, num_classes=k, chunk_rows=chunk_rows)


def _calibrated(n, **kw):
    kw.setdefault("noise_multiplier", 1.0)
    return DPSGDLogistic(num_examples=n, **kw)


@pytest.mark.parametrize("epsilon,delta", [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-5)])
def test_calibration_round_trip_pld(epsilon, delta):
    head = DPSGDLogistic(batch_size=1000, epochs=10).calibrate(
        epsilon=epsilon, delta=delta, num_examples=50_000
    )
    event = head.dp_event()
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            0.02, dp_accounting.GaussianDpEvent(head.noise_multiplier)
        ),
        500,
    )
    spent = accounting.epsilon_of(event, delta, "pld")
    assert 0.99 * epsilon <= spent <= epsilon
    assert head.noise_multipliers() == {"gradient": head.noise_multiplier}


def test_calibration_round_trip_rdp_needs_more_noise_than_pld():
    kw = dict(epsilon=1.0, delta=1e-5, num_examples=20_000)
    rdp = DPSGDLogistic(accountant="rdp", batch_size=500).calibrate(**kw)
    pld = DPSGDLogistic(batch_size=500).calibrate(**kw)
    spent = accounting.epsilon_of(rdp.dp_event(), 1e-5, "rdp")
    assert 0.99 <= spent <= 1.0
    assert rdp.noise_multiplier > pld.noise_multiplier


def test_calibration_needs_num_examples_and_a_sane_budget():
    with pytest.raises(ValueError, match="num_examples must be a positive int"):
        DPSGDLogistic().calibrate(epsilon=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        DPSGDLogistic(batch_size=10).calibrate(epsilon=1.0, delta=0.01, num_examples=1000)
    with pytest.raises(ValueError, match="batch_size=2048 exceeds"):
        DPSGDLogistic().calibrate(epsilon=1.0, delta=1e-5, num_examples=1000)


def test_fit_refuses_data_of_another_size():
    head = DPSGDLogistic(batch_size=50).calibrate(epsilon=1.0, delta=1e-5, num_examples=601)
    with pytest.raises(ValueError, match="calibrated for num_examples=601"):
        head.fit(_data(), key=rk(0))


def test_noise_is_independent_across_classes_and_steps_and_has_the_stated_scale():
    """Captures the noise actually added; the reference bug (one draw shared) would fail."""
    data = _data(n=300, d=400, k=4)
    head = _calibrated(300, batch_size=30, epochs=3, noise_multiplier=2.0, l2_grad_clip=0.5)
    noises = []

    def on_step(step, clean, noisy):
        zw = np.asarray(noisy["weights"] - clean["weights"])  # (d, K)
        zb = np.asarray(noisy["bias"] - clean["bias"])  # (K,)
        noises.append(np.vstack([zw, zb[None]]).T)  # (K, d + 1): one row per class

    head.fit(data, key=rk(0), on_step=on_step)
    z = np.stack(noises)  # (T, K, d + 1)
    assert z.shape == (30, 4, 401)
    np.testing.assert_allclose(z.std(), 2.0 * 0.5, rtol=0.02)
    rows = z.reshape(-1, 401)
    corr = np.corrcoef(rows)
    off = np.abs(corr[~np.eye(len(rows), dtype=bool)])
    assert off.max() < 0.3  # independent rows: |corr| ~ 1/sqrt(401); shared noise gives 1.0
    shared = np.repeat(z[:, :1], 4, axis=1).reshape(-1, 401)  # the reference bug, for contrast
    assert np.abs(np.corrcoef(shared)[0, 1]) > 0.99


def test_empty_batches_still_add_noise_and_take_a_step():
    data = _data(n=2000, d=3)
    head = _calibrated(2000, batch_size=1, epochs=0.01, learning_rate=0.1, momentum=0.0)
    seen = []
    head.fit(data, key=rk(3), on_step=lambda t, clean, noisy: seen.append((clean, noisy)))
    assert len(seen) == 20  # ceil(0.01 * 2000 / 1)
    empty = [
        (c, z) for c, z in seen if not np.any(np.asarray(c["weights"])) and not np.any(c["bias"])
    ]
    assert len(empty) >= 2  # P(empty) = (1 - 1/2000)^2000 ~ 0.37 per step
    for _, z in empty:
        assert np.all(np.asarray(z["weights"]) != 0) and np.all(np.asarray(z["bias"]) != 0)
    w = head.fit(data, key=rk(3))["weights"]
    assert np.any(w != 0)


def test_streamed_fit_equals_cached_fit_and_seeds_reproduce():
    data = _data(n=500, chunk_rows=64)
    head = _calibrated(500, batch_size=100, epochs=2)
    cached = head.fit(data, key=rk(1))
    streamed = dataclasses.replace(head, max_in_memory_bytes=0).fit(data, key=rk(1))
    np.testing.assert_allclose(cached["weights"], streamed["weights"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached["bias"], streamed["bias"], rtol=1e-4, atol=1e-5)
    again = head.fit(data, key=rk(1))
    np.testing.assert_array_equal(cached["weights"], again["weights"])
    assert not np.allclose(head.fit(data, key=rk(2))["weights"], cached["weights"])


def test_vanishing_noise_full_batch_is_plain_gradient_descent_on_the_logistic_loss():
    """q = 1, no clipping, noise ~ 0: DP-SGD must equal optax on the mean loss."""
    data = _data(n=256)
    head = _calibrated(
        256, batch_size=256, epochs=15, noise_multiplier=1e-9, l2_grad_clip=100.0, learning_rate=0.5
    )
    got = head.fit(data, key=rk(0))
    x = bound_rows(data.features, 1.0, "normalize")
    y = jnp.asarray(data.labels)

    def loss(p):
        logits = x @ p["weights"] + p["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    params = {"weights": jnp.zeros((6, 3)), "bias": jnp.zeros(3)}
    opt = optax.sgd(0.5, momentum=0.9)
    state = opt.init(params)
    for _ in range(15):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(got["weights"], params["weights"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bias"], params["bias"], rtol=1e-4, atol=1e-5)


def test_converges_to_the_noiseless_head_as_epsilon_grows():
    data = _data(n=1000)
    base = DPSGDLogistic(batch_size=200, epochs=5, learning_rate=1.0)
    exact = dataclasses.replace(base, noise_multiplier=1e-9, num_examples=1000).fit(data, key=rk(0))
    errors = []
    for eps in (0.3, 3.0, 30.0):
        head = base.calibrate(epsilon=eps, delta=1e-5, num_examples=1000)
        errs = [
            np.linalg.norm(head.fit(data, key=rk(s))["weights"] - exact["weights"]) for s in (0, 1)
        ]
        errors.append(np.median(errs))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 * np.linalg.norm(exact["weights"])
    x = bound_rows(data.features, 1.0, "normalize")
    acc = np.mean(np.argmax(np.asarray(x @ exact["weights"] + exact["bias"]), 1) == data.labels)
    assert acc > 0.9


@pytest.mark.parametrize(
    "params,match",
    [
        ({"l2_clip_norm": 0}, "dp_sgd: l2_clip_norm must be > 0"),
        ({"feature_transform": "zca"}, r"feature_transform must be one of .*, got 'zca'"),
        ({"l2_grad_clip": -1.0}, "l2_grad_clip must be > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"batch_size": 10.5}, "batch_size must be an integer >= 1, got 10.5"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"optimizer": "rmsprop"}, r"optimizer must be one of \('sgd', 'adam'\), got 'rmsprop'"),
        ({"lr_schedule": "step"}, r"lr_schedule must be one of .*, got 'step'"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"learning_rate": 0}, "learning_rate must be > 0"),
        ({"accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        DPSGDLogistic(**params)


def test_uncalibrated_head_refuses_to_fit_or_account():
    with pytest.raises(ValueError, match="not calibrated"):
        DPSGDLogistic().dp_event()
    with pytest.raises(ValueError, match="not calibrated"):
        DPSGDLogistic().fit(_data(), key=rk(0))
    assert "noise_multiplier" not in DPSGDLogistic().hyperparameters()
    assert "num_examples" not in DPSGDLogistic().hyperparameters()
