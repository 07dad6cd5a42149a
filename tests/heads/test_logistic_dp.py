"""Closed-form clipped gradients, exact Poisson sampling and keys of the logistic DP heads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.heads import logistic_dp as ldp
from pipeline_lib.privacy import noise, sampling
from pipeline_lib.privacy.clipping import bound_rows
from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private

D, K = 5, 3


def _example_grad(weights, bias_param, x, y, bias_scale):
    """Autodiff gradient of one example's loss with respect to (W, b~), flattened."""

    def loss(w, b):
        logits = x @ w + bias_scale * b
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    gw, gb = jax.grad(loss, argnums=(0, 1))(weights, bias_param)
    return gw, gb


def _problem(n=40, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = bound_rows(rng.normal(size=(n, D)) * scale, 1.0, "clip")
    y = jnp.asarray(rng.integers(0, K, n), jnp.int32)
    w = jnp.asarray(rng.normal(size=(D, K)), jnp.float32)
    b = jnp.asarray(rng.normal(size=K), jnp.float32)
    return x, y, w, b


@pytest.mark.parametrize("bias_scale", [1.0, 0.3])
def test_closed_form_norms_and_clipped_sum_match_autodiff(bias_scale):
    x, y, w, b = _problem()
    gws, gbs = jax.vmap(lambda xi, yi: _example_grad(w, b, xi, yi, bias_scale))(x, y)
    norms = np.sqrt(np.sum(np.asarray(gws) ** 2, axis=(1, 2)) + np.sum(np.asarray(gbs) ** 2, 1))
    closed = ldp.per_example_grad_sq_norms(w, bias_scale * b, x, y, bias_scale=bias_scale)
    np.testing.assert_allclose(np.sqrt(closed), norms, rtol=1e-5)
    clip = float(np.median(norms))  # about half the examples get clipped
    factor = np.minimum(1.0, clip / norms)
    mask = jnp.asarray(np.arange(len(y)) % 4 != 0, jnp.float32)  # some rows masked out
    want_w = np.einsum("n,nij->ij", factor * np.asarray(mask), np.asarray(gws))
    want_b = np.einsum("n,nj->j", factor * np.asarray(mask), np.asarray(gbs))
    gw, gb = ldp.clipped_grad_sum(w, b, x, y, mask, l2_grad_clip=clip, bias_scale=bias_scale)
    np.testing.assert_allclose(gw, want_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, want_b, rtol=1e-4, atol=1e-5)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(np.float32, (12, D), elements=finite),
    labels=hnp.arrays(np.int32, 12, elements=st.integers(0, K - 1)),
    new_x=hnp.arrays(np.float32, D, elements=finite),
    new_y=st.integers(0, K - 1),
    params=hnp.arrays(np.float32, (D + 1, K), elements=st.floats(-50, 50, width=32)),
    clip=st.floats(0.01, 10.0),
    bias_scale=st.sampled_from([1.0, 0.5]),
)
def test_adding_one_example_moves_clipped_sum_by_at_most_the_clip(
    data, labels, new_x, new_y, params, clip, bias_scale
):
    """Sensitivity G of every gradient release, for arbitrary (unbounded) raw features."""
    w, b = jnp.asarray(params[:D]), jnp.asarray(params[D])

    def clipped_sum(x, y):
        xb = bound_rows(x, 1.0, "normalize")
        mask = jnp.ones(len(y), jnp.float32)
        gw, gb = ldp.clipped_grad_sum(w, b, xb, y, mask, l2_grad_clip=clip, bias_scale=bias_scale)
        return np.concatenate([np.ravel(gw), np.ravel(gb)]).astype(np.float64)

    before = clipped_sum(data, labels)
    after = clipped_sum(np.vstack([data, new_x[None]]), np.append(labels, new_y))
    assert np.linalg.norm(after - before) <= clip * (1 + 1e-4) + 1e-5


def test_without_gradient_clipping_one_example_exceeds_the_bound():
    """Clipping is what enforces the bound: the raw gradient of one example is larger."""
    w, b = jnp.zeros((D, K)), jnp.zeros(K)
    x = bound_rows(jnp.ones((1, D)), 1.0, "normalize")
    y = jnp.zeros(1, jnp.int32)
    norm = float(jnp.sqrt(ldp.per_example_grad_sq_norms(w, b, x, y)[0]))
    # (||x||^2 + 1) ||p - y||^2 = 2 (1 - 1/K) at zero weights
    assert norm == pytest.approx(np.sqrt(2 * (1 - 1 / K)), rel=1e-5)
    one = jnp.ones(1)
    unclipped = ldp.clipped_grad_sum(w, b, x, y, one, l2_grad_clip=1e6)
    clipped = ldp.clipped_grad_sum(w, b, x, y, one, l2_grad_clip=0.5)

    def flat(g):
        return np.concatenate([np.ravel(g[0]), np.ravel(g[1])])

    assert np.linalg.norm(flat(unclipped)) > 2 * 0.5  # a change far beyond G = 0.5
    assert np.linalg.norm(flat(clipped)) <= 0.5


def test_key_stream_matches_release_key_and_per_class_noise():
    stream = noise.KeyStream(rk(11), "dp_sgd/gradient")
    for index, step in [(0, 0), (3, 7), (9, 123)]:
        want = jax.random.key_data(
            noise.release_key(rk(11), "dp_sgd/gradient", index=index, step=step)
        )
        np.testing.assert_array_equal(jax.random.key_data(stream.key(index, step)), want)
    got = noise.per_class_normal(stream.base, 5, num_classes=4, dim=30)
    want = noise.gaussian_per_class(rk(11), "dp_sgd/gradient", 4, 30, 1.0, step=5)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _features(n=2500, d=4, k=3, seed=0, chunk_rows=256):
    rng = np.random.default_rng(seed)
    return InMemoryFeatures(
        rng.normal(size=(n, d)) * 5, rng.integers(0, k, n), num_classes=k, chunk_rows=chunk_rows
    )


def _both(data, **kw):
    common = dict(l2_clip_norm=1.0, transform="normalize")
    cached = ldp.BoundedRows(data, max_in_memory_bytes=1e9, **common)
    streamed = ldp.BoundedRows(data, max_in_memory_bytes=0, **common)
    assert cached.cached and not streamed.cached
    return cached, streamed


def test_poisson_sampling_is_exact_reproducible_and_the_same_cached_or_streamed():
    data = _features()
    cached, streamed = _both(data)
    stream = noise.KeyStream(rk(4), "dp_sgd/poisson")
    q, steps, n = 0.1, 200, data.num_examples
    hits = np.zeros((steps, n), bool)
    for t in range(steps):
        idx = cached.poisson_indices(stream, t, q)
        if t < 5:
            np.testing.assert_array_equal(idx, streamed.poisson_indices(stream, t, q))
        hits[t, idx] = True
    np.testing.assert_array_equal(
        hits[3], np.isin(np.arange(n), cached.poisson_indices(stream, 3, q))
    )
    # each (example, step) is Bernoulli(q): mean q, binomial spread of the batch sizes
    assert abs(hits.mean() - q) < 5 * np.sqrt(q * (1 - q) / hits.size)
    sizes = hits.sum(1)
    assert np.std(sizes) == pytest.approx(np.sqrt(n * q * (1 - q)), rel=0.25)
    # independent across steps and across examples (a shared draw would correlate fully)
    assert abs(np.corrcoef(hits[:-1].ravel(), hits[1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(hits[:, :-1].ravel(), hits[:, 1:].ravel())[0, 1]) < 0.02
    # another seed, another sample
    other = cached.poisson_indices(noise.KeyStream(rk(5), "dp_sgd/poisson"), 3, q)
    assert not np.array_equal(other, cached.poisson_indices(stream, 3, q))


def test_sampled_and_full_gradient_sums_agree_between_cache_and_stream():
    data = _features(n=1000, chunk_rows=96)
    cached, streamed = _both(data)
    rng = np.random.default_rng(1)
    params = {
        "weights": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    stream = noise.KeyStream(rk(0), "dp_sgd/poisson")
    kw = dict(sub_rows=64, l2_grad_clip=0.7, bias_scale=0.5)  # batches of ~300: several pieces
    a = cached.sampled_grad_sum(params, stream, 2, 0.3, **kw)
    b = streamed.sampled_grad_sum(params, stream, 2, 0.3, **kw)
    idx = cached.poisson_indices(stream, 2, 0.3)
    xb = bound_rows(data.features[idx], 1.0, "normalize")
    want = ldp.clipped_grad_sum(
        params["weights"],
        params["bias"],
        xb,
        jnp.asarray(data.labels[idx]),
        jnp.ones(len(idx)),
        l2_grad_clip=0.7,
        bias_scale=0.5,
    )
    for got in (a, b):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
    full_a = ldp.full_grad_sum(params, cached, l2_grad_clip=0.7)
    full_b = ldp.full_grad_sum(params, streamed, l2_grad_clip=0.7)
    np.testing.assert_allclose(full_a[0], full_b[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(full_a[1], full_b[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("q", [0.02, 1 / 3, 2048 / 60_000, 1e-9, 1.0])
def test_bernoulli_threshold_never_exceeds_q(q):
    t = float(sampling.bernoulli_threshold(q))
    assert t <= q and q - t < 2.0**-23
    # on the grid of jax's float32 uniforms, so that P(u < t) = t exactly
    assert (t * 2**23) == int(t * 2**23)


def test_empty_batch_has_zero_gradient_sum():
    data = _features(n=300)
    cached, streamed = _both(data)
    stream = noise.KeyStream(rk(0), "x")
    params = {"weights": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}
    for rows in (cached, streamed):
        assert len(rows.poisson_indices(stream, 0, 1e-9)) == 0
        gw, gb = rows.sampled_grad_sum(params, stream, 0, 1e-9, sub_rows=64, l2_grad_clip=1.0)
        assert not np.any(np.asarray(gw)) and not np.any(np.asarray(gb))
