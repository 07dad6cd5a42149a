"""DP-FC head: covariance release, preconditioned DP steps, accounting, and limits."""

import dataclasses

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads import logistic_dp as ldp
from pipeline_lib.heads.dp_fc import DPFeatureCovariance
from pipeline_lib.privacy import accounting
from pipeline_lib.privacy.clipping import bound_rows
from pipeline_lib.privacy.noise import NoiseKey
from tests.store_helpers import write_array_store

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private


def _data(n=600, d=6, k=3, seed=0, chunk_rows=128):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centers = rng.normal(size=(k, d))
    x = centers[y] + 0.6 * rng.normal(size=(n, d))
    return InMemoryFeatures(x, y, num_classes=k, chunk_rows=chunk_rows)


def _gram(head, x):
    data = InMemoryFeatures(x, np.zeros(len(x), np.int32), num_classes=1, chunk_rows=8)
    rows = ldp.BoundedRows(
        data,
        l2_clip_norm=head.l2_clip_norm,
        transform=head.feature_transform,
        max_in_memory_bytes=0,
    )
    return head.augmented_gram(rows)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    data=hnp.arrays(np.float32, (10, 4), elements=finite),
    new_x=hnp.arrays(np.float32, 4, elements=finite),
    clip=st.floats(0.1, 5.0),
    bias_scale=st.floats(0.1, 3.0),
    transform=st.sampled_from(["clip", "normalize"]),
)
def test_adding_one_example_moves_the_gram_by_at_most_its_sensitivity(
    data, new_x, clip, bias_scale, transform
):
    head = DPFeatureCovariance(
        l2_clip_norm=clip, bias_scale=bias_scale, feature_transform=transform
    )
    before = _gram(head, data)
    after = _gram(head, np.vstack([data, new_x[None]]))
    assert np.linalg.norm(after - before) <= head.covariance_sensitivity * (1 + 1e-5)
    assert head.covariance_sensitivity == pytest.approx(clip**2 + bias_scale**2)


def test_feature_bounding_is_what_enforces_the_gram_sensitivity():
    x = np.full((1, 4), 10.0, np.float32)
    unbounded = np.outer(np.append(x[0], 1.0), np.append(x[0], 1.0))
    head = DPFeatureCovariance()
    assert np.linalg.norm(unbounded) > 100 * head.covariance_sensitivity
    assert np.linalg.norm(_gram(head, x)) <= head.covariance_sensitivity
    np.testing.assert_allclose(_gram(head, x)[-1, -1], 1.0)  # the constant feature a^2 = 1


def test_covariance_release_noise_has_the_stated_scale_and_is_symmetric():
    d = 80
    head = DPFeatureCovariance(l2_clip_norm=2.0, bias_scale=1.0, noise_multiplier=0.7)
    e = head.release_covariance(np.zeros((d + 1, d + 1)), key=rk(3))
    sigma = 0.7 * (4.0 + 1.0)
    np.testing.assert_array_equal(e, e.T)
    off = e[~np.eye(d + 1, dtype=bool)]
    assert np.std(np.diag(e)) == pytest.approx(sigma, rel=0.3)
    assert np.std(off) == pytest.approx(sigma / np.sqrt(2), rel=0.05)
    assert not np.allclose(head.release_covariance(np.zeros((d + 1, d + 1)), key=rk(4)), e)


def test_preconditioner_projects_to_psd_and_adds_the_public_ridge():
    head = DPFeatureCovariance(ridge_lambda=0.5, ridge_noise_factor=0.0, noise_multiplier=1.0)
    evecs, inv = head.preconditioner(np.diag([4.0, -30.0, 1.0]))
    np.testing.assert_allclose(np.sort(1 / inv), [0.5, 1.5, 4.5])
    p = evecs @ np.diag(inv) @ evecs.T
    np.testing.assert_allclose(p, np.diag([1 / 4.5, 1 / 0.5, 1 / 1.5]), atol=1e-12)
    noisy = DPFeatureCovariance(ridge_lambda=0.0, noise_multiplier=2.0)
    assert noisy.ridge(99) == pytest.approx(0.25 * 2.0 * 2.0 * 10.0)


@pytest.mark.parametrize("epsilon,delta", [(0.5, 1e-5), (1.0, 1e-5), (3.0, 1e-6), (8.0, 1e-5)])
def test_calibration_round_trip_full_batch(epsilon, delta):
    head = DPFeatureCovariance(num_steps=25, covariance_share=0.4).calibrate(
        epsilon=epsilon, delta=delta
    )
    s = head.noise_multiplier
    m = head.noise_multipliers()
    assert m["covariance"] == s
    assert m["gradient"] == pytest.approx(s * np.sqrt(25 * 0.4 / 0.6))
    assert head.dp_event() == dp_accounting.ComposedDpEvent(
        [
            dp_accounting.GaussianDpEvent(s),
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(m["gradient"]), 25),
        ]
    )
    spent = accounting.epsilon_of(head.dp_event(), delta, "pld")
    assert 0.99 * epsilon <= spent <= epsilon
    # exact: the composition is one Gaussian with multiplier s sqrt(f)
    single = dp_accounting.get_sigma_gaussian(epsilon, delta)
    equivalent = accounting.gaussian_equivalent_multiplier([s] + [m["gradient"]] * 25)
    assert equivalent == pytest.approx(s * np.sqrt(0.4))
    assert equivalent == pytest.approx(single, rel=0.01)


def test_calibration_round_trip_poisson_and_rdp():
    head = DPFeatureCovariance(batch_size=500, num_steps=200)
    with pytest.raises(ValueError, match="needs num_examples"):
        head.calibrate(epsilon=1.0, delta=1e-5)
    pld = head.calibrate(epsilon=1.0, delta=1e-5, num_examples=20_000)
    grad = pld.dp_event().events[1].event
    assert isinstance(grad, dp_accounting.PoissonSampledDpEvent)
    assert grad.sampling_probability == 500 / 20_000
    assert 0.99 <= accounting.epsilon_of(pld.dp_event(), 1e-5, "pld") <= 1.0
    rdp = dataclasses.replace(head, accountant="rdp").calibrate(
        epsilon=1.0, delta=1e-5, num_examples=20_000
    )
    assert 0.99 <= accounting.epsilon_of(rdp.dp_event(), 1e-5, "rdp") <= 1.0
    assert rdp.noise_multiplier > pld.noise_multiplier


def test_gradient_noise_is_independent_across_classes_and_steps():
    """Captures the noise actually added; the reference bug (one draw shared) would fail."""
    data = _data(n=200, d=300, k=4)
    head = DPFeatureCovariance(num_steps=20, noise_multiplier=1.0, l2_grad_clip=0.5)
    noises = []

    def on_step(step, clean, noisy):
        zw = np.asarray(noisy["weights"] - clean["weights"])
        zb = np.asarray(noisy["bias"] - clean["bias"])
        noises.append(np.vstack([zw, zb[None]]).T)  # (K, d + 1)

    head.fit(data, key=rk(0), on_step=on_step)
    z = np.stack(noises)
    assert z.shape == (20, 4, 301)
    np.testing.assert_allclose(z.std(), head.noise_multipliers()["gradient"] * 0.5, rtol=0.02)
    rows = z.reshape(-1, 301)
    off = np.abs(np.corrcoef(rows)[~np.eye(len(rows), dtype=bool)])
    assert off.max() < 0.3  # independent: ~1/sqrt(301); a shared draw gives 1.0
    shared = np.repeat(z[:, :1], 4, axis=1).reshape(-1, 301)
    assert np.abs(np.corrcoef(shared)[0, 1]) > 0.99


def test_vanishing_noise_is_preconditioned_gradient_descent_on_the_logistic_loss():
    """Noise ~ 0, no clipping: W~ <- W~ - lr (X~^T X~ + lambda I)^-1 grad of the summed loss."""
    data = _data(n=300)
    head = DPFeatureCovariance(
        num_steps=8,
        learning_rate=1.5,
        l2_grad_clip=100.0,
        ridge_lambda=2.0,
        bias_scale=0.5,
        noise_multiplier=1e-9,
    )
    got = head.fit(data, key=rk(0))
    x = bound_rows(data.features, 1.0, "normalize")
    xa = jnp.concatenate([x, jnp.full((300, 1), 0.5)], axis=1)
    precond = jnp.linalg.inv(xa.T @ xa + 2.0 * jnp.eye(7))
    y = jnp.asarray(data.labels)

    def loss(w):
        return optax.softmax_cross_entropy_with_integer_labels(xa @ w, y).sum()

    w = jnp.zeros((7, 3))
    for _ in range(8):
        w = w - 1.5 * precond @ jax.grad(loss)(w)
    np.testing.assert_allclose(got["weights"], w[:6], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got["bias"], 0.5 * w[6], rtol=1e-3, atol=1e-4)
    acc = np.mean(np.argmax(np.asarray(x @ got["weights"] + got["bias"]), 1) == data.labels)
    assert acc > 0.9


def test_converges_to_the_noiseless_head_as_epsilon_grows():
    data = _data(n=1000)
    base = DPFeatureCovariance(ridge_lambda=1.0)
    exact = dataclasses.replace(base, noise_multiplier=1e-9).fit(data, key=rk(0))["weights"]
    errors = []
    for eps in (0.3, 3.0, 30.0):
        head = base.calibrate(epsilon=eps, delta=1e-5)
        errs = [np.linalg.norm(head.fit(data, key=rk(s))["weights"] - exact) for s in (0, 1)]
        errors.append(np.median(errs))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.25 * np.linalg.norm(exact)


def test_streamed_fit_equals_cached_fit_full_batch_and_poisson():
    data = _data(n=500, chunk_rows=64)
    for head in (
        DPFeatureCovariance(noise_multiplier=1.0),
        DPFeatureCovariance(noise_multiplier=1.0, batch_size=100, num_examples=500),
    ):
        cached = head.fit(data, key=rk(1))
        streamed = dataclasses.replace(head, max_in_memory_bytes=0).fit(data, key=rk(1))
        np.testing.assert_allclose(cached["weights"], streamed["weights"], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(cached["bias"], streamed["bias"], rtol=1e-3, atol=1e-4)
        assert not np.allclose(head.fit(data, key=rk(2))["weights"], cached["weights"])


def test_poisson_fit_refuses_data_of_another_size():
    head = DPFeatureCovariance(batch_size=50).calibrate(epsilon=1.0, delta=1e-5, num_examples=601)
    with pytest.raises(ValueError, match="calibrated for num_examples=601"):
        head.fit(_data(), key=rk(0))


@pytest.mark.parametrize(
    "params,match",
    [
        ({"l2_clip_norm": -1}, "dp_fc: l2_clip_norm must be > 0"),
        ({"feature_transform": "whiten"}, r"feature_transform must be one of .*, got 'whiten'"),
        ({"l2_grad_clip": 0}, "l2_grad_clip must be > 0"),
        ({"bias_scale": 0}, "bias_scale must be > 0"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"covariance_share": 1.0}, "covariance_share must be in"),
        ({"ridge_lambda": -1}, "ridge_lambda must be >= 0"),
        ({"ridge_lambda": 0, "ridge_noise_factor": 0}, "cannot both be 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1 or null"),
        ({"accountant": "zcdp"}, "accountant must be one of"),
    ],
)
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        DPFeatureCovariance(**params)


def test_uncalibrated_head_refuses_to_fit():
    with pytest.raises(ValueError, match="not calibrated"):
        DPFeatureCovariance().fit(_data(), key=rk(0))
    hp = DPFeatureCovariance().hyperparameters()
    assert "noise_multiplier" not in hp and "num_examples" not in hp


# --- the augmented X^T X, shared by the runs of one process ---------------------------------


def _write_store(path, n=700, d=6, k=3, seed=0, shift=0.0, chunk_rows=128):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int32)
    x = (rng.normal(size=(k, d))[y] + 0.6 * rng.normal(size=(n, d)) + shift).astype(np.float32)
    return write_array_store(
        path, x, y, num_classes=k, dataset="syn", split="train", chunk_rows=chunk_rows
    )


def test_runs_of_one_store_share_the_augmented_gram_with_identical_results(tmp_path, monkeypatch):
    from pipeline_lib import sweep
    from pipeline_lib.features.split import RowSubset
    from pipeline_lib.heads import dp_fc, stats

    monkeypatch.setattr(dp_fc, "GRAMS", stats.StatsMemo())
    passes = []
    original = dp_fc.DPFeatureCovariance._augmented_gram_pass
    monkeypatch.setattr(
        dp_fc.DPFeatureCovariance,
        "_augmented_gram_pass",
        lambda self, rows: passes.append(1) or original(self, rows),
    )
    path = _write_store(tmp_path / "train.zarr")
    data = sweep.StoreCache(budget_mb=64).open(path)
    head = DPFeatureCovariance(num_steps=3, noise_multiplier=2.0)
    first = head.fit(data, key=rk(5))
    again = head.fit(data, key=rk(5))  # another run, same noise seed: the memo serves X~^T X~
    assert len(passes) == 1 and dp_fc.GRAMS.computed == 1
    for name in ("weights", "bias"):
        np.testing.assert_array_equal(again[name], first[name])
    other_seed = head.fit(data, key=rk(6))  # still its own noise
    assert len(passes) == 1 and not np.allclose(other_seed["weights"], first["weights"])
    # other bounds, the streamed store and a part of it are other entries
    dataclasses.replace(head, bias_scale=0.5).fit(data, key=rk(5))
    dataclasses.replace(head, l2_clip_norm=0.5).fit(data, key=rk(5))
    head.fit(RowSubset(data, part="fit", fraction=0.2), key=rk(5))
    assert len(passes) == 4
    # the same store streamed from disk is the same data: served from the memo
    streamed = head.fit(FeatureStore(path), key=rk(5))
    assert len(passes) == 4
    np.testing.assert_allclose(streamed["weights"], first["weights"], rtol=1e-5, atol=1e-6)
    # a fresh process (an empty memo) gives bit-identical results
    monkeypatch.setattr(dp_fc, "GRAMS", stats.StatsMemo())
    cold = head.fit(data, key=rk(5))
    for name in ("weights", "bias"):
        np.testing.assert_array_equal(cold[name], first[name])
    # data without a store fingerprint (in-memory arrays) is never memoised
    mem = InMemoryFeatures(*data.read_all(), num_classes=3, chunk_rows=128)
    head.fit(mem, key=rk(5))
    head.fit(mem, key=rk(5))
    assert len(passes) == 7


def test_a_rewritten_store_is_not_served_a_stale_gram(tmp_path, monkeypatch):
    from pipeline_lib import sweep
    from pipeline_lib.features import store as fs
    from pipeline_lib.heads import dp_fc, stats

    monkeypatch.setattr(dp_fc, "GRAMS", stats.StatsMemo())
    path = _write_store(tmp_path / "train.zarr")
    cache = sweep.StoreCache(budget_mb=64)
    head = DPFeatureCovariance(num_steps=2, noise_multiplier=2.0, feature_transform="clip")
    rows = lambda data: ldp.BoundedRows(  # noqa: E731
        data, l2_clip_norm=1.0, transform="clip", max_in_memory_bytes=2e9
    )
    before = head.augmented_gram(rows(cache.open(path)))
    fs.shutil.rmtree(path)  # re-extracted at the same path with other contents
    _write_store(path, shift=3.0)
    after = head.augmented_gram(rows(cache.open(path)))
    fresh = head._augmented_gram_pass(rows(FeatureStore(path)))
    assert dp_fc.GRAMS.computed == 2
    np.testing.assert_allclose(after, fresh, rtol=1e-6, atol=1e-6)
    assert not np.allclose(after, before, atol=1e-2)
    with pytest.raises(ValueError):  # shared between runs: read-only
        after[0, 0] = 1.0
