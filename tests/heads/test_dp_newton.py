"""DP-Newton: sensitivities, accounting, noise independence, blocking, streaming, limits."""

import dataclasses
import math

import dp_accounting
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.heads import dp_newton
from pipeline_lib.heads.dp_newton import DPNewton, hessian_class_block_size
from pipeline_lib.privacy import accounting
from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private

K, D = 4, 5


def _toy(n=600, d=8, k=3, seed=0, chunk_rows=128, spread=0.6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(k, d))[y] + spread * rng.normal(size=(n, d))
    return InMemoryFeatures(x, y, num_classes=k, chunk_rows=chunk_rows), x, y


def _exact(head, x, y, w, k, chunk_rows=8):
    """Un-noised gradient and Hessians of all k classes, as fit computes them."""
    data = InMemoryFeatures(x, y, num_classes=k, chunk_rows=chunk_rows)
    g, h = head.exact_statistics(
        head.chunk_source(data), jnp.asarray(w, jnp.float32), np.arange(k), len(y), k
    )
    return np.asarray(g, np.float64), np.asarray(h, np.float64)


def _first_step(head, x, y, k, chunk_rows=8):
    data = InMemoryFeatures(x, y, num_classes=k, chunk_rows=chunk_rows)
    d_aug = dp_newton.augmented_dim(x.shape[1], head.bias_feature)
    a, b = head.exact_first_step_statistics(head.chunk_source(data), d_aug, len(y), k)
    return np.asarray(a, np.float64), np.asarray(b, np.float64)


# --- sensitivity ------------------------------------------------------------------------

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
logit_weights = arrays(np.float32, (D + 1, K), elements=st.floats(-60, 60, width=32))


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.float32, (6, D), elements=finite),
    y=arrays(np.int32, 6, elements=st.integers(0, K - 1)),
    new_x=arrays(np.float32, (1, D), elements=finite),
    new_y=st.integers(0, K - 1),
    w=logit_weights,
    c=st.floats(0.1, 10.0),
    b0=st.sampled_from([0.0, 0.5, 3.0]),
    rho=st.sampled_from([0.3, 0.5, 1.0]),
    rho_h=st.sampled_from([0.2, 0.35, 1.0]),
    transform=st.sampled_from(["clip", "normalize"]),
)
def test_adding_one_example_moves_each_release_by_at_most_its_sensitivity(
    x, y, new_x, new_y, w, c, b0, rho, rho_h, transform
):
    head = DPNewton(
        l2_clip_norm=c,
        feature_transform=transform,
        bias_feature=b0,
        residual_clip_fraction=rho,
        hessian_clip_fraction=rho_h,
    )
    if b0 == 0:
        w = w[:D]
    sens = head.sensitivities(K)
    g0, h0 = _exact(head, x, y, w, K)
    g1, h1 = _exact(head, np.concatenate([x, new_x]), np.append(y, new_y), w, K)
    gz, hz = _exact(head, new_x, np.array([new_y]), w, K)  # the example's own contribution
    # Each release is a sum: adding the example adds exactly its contribution...
    np.testing.assert_allclose(g1 - g0, gz, atol=1e-5 * sens["gradient"] * 8)
    np.testing.assert_allclose(h1 - h0, hz, atol=1e-5 * sens["hessian"] * 8)
    # ...whose norm over all K classes together is within the stated sensitivity.
    assert np.linalg.norm(gz) <= sens["gradient"]
    assert np.linalg.norm(hz) <= sens["hessian"]
    r2 = c**2 + b0**2
    assert sens["gradient"] == pytest.approx(math.sqrt(r2) * rho * math.sqrt(K))
    assert sens["hessian"] == pytest.approx(r2 * rho_h * math.sqrt(K) / 4)
    # The shared first step's releases: X~^T X~ and X~^T Y.
    a0, b0_ = _first_step(head, x, y, K)
    a1, b1 = _first_step(head, np.concatenate([x, new_x]), np.append(y, new_y), K)
    az, bz = _first_step(head, new_x, np.array([new_y]), K)
    np.testing.assert_allclose(a1 - a0, az, atol=1e-5 * r2 * 8)
    np.testing.assert_allclose(b1 - b0_, bz, atol=1e-5 * math.sqrt(r2) * 8)
    assert np.linalg.norm(az) <= sens["gram"] == pytest.approx(r2)
    assert np.linalg.norm(bz) <= sens["label_sums"] == pytest.approx(math.sqrt(r2))


def _one_row_contribution(xa, label, w, residual_bound, hessian_weight_bound):
    k = w.shape[1]
    g, h = dp_newton.accumulate_chunk(
        jnp.zeros((xa.shape[1], k)),
        jnp.zeros((k, xa.shape[1], xa.shape[1])),
        jnp.asarray(xa, jnp.float32),
        jnp.asarray([label], jnp.int32),
        jnp.ones(1, jnp.float32),
        jnp.asarray(w, jnp.float32),
        jnp.arange(k),
        num_classes=k,
        residual_bound=residual_bound,
        hessian_weight_bound=hessian_weight_bound,
    )
    return np.linalg.norm(np.asarray(g, np.float64)), np.linalg.norm(np.asarray(h, np.float64))


def test_clipping_is_what_enforces_the_bounds():
    head = DPNewton(
        l2_clip_norm=1.0, bias_feature=1.0, residual_clip_fraction=0.5, hessian_clip_fraction=0.3
    )
    sens = head.sensitivities(K)
    bound, a_bound = head.residual_bound(K), head.hessian_weight_bound(K)
    assert (bound, a_bound) == (0.5 * math.sqrt(K), 0.3 * math.sqrt(K) / 4)
    # A label-0 example that every head gets confidently wrong: ||r|| -> sqrt(K).
    w = np.full((D + 1, K), 60.0, np.float32)
    w[:, 0] = -60.0
    raw = np.ones((1, D), np.float32)  # norm sqrt(5) > C = 1
    bounded = np.asarray(
        dp_newton.augment_rows(
            raw, np.ones(1, np.float32), l2_clip_norm=1.0, transform="clip", bias_feature=1.0
        )
    )
    g_ok, h_ok = _one_row_contribution(bounded, 0, w, bound, a_bound)
    assert g_ok <= sens["gradient"] and h_ok <= sens["hessian"]
    # Without the residual clip, the gradient bound fails...
    g_no_rclip, _ = _one_row_contribution(bounded, 0, w, 1e9, a_bound)
    assert g_no_rclip > 1.9 * sens["gradient"]
    # ...at W = 0 (every a_k = 1/4) the Hessian bound fails without the weight clip...
    w0 = np.zeros((D + 1, K))
    g_ok, h_ok = _one_row_contribution(bounded, 0, w0, bound, a_bound)
    assert g_ok <= sens["gradient"] and h_ok <= sens["hessian"]
    _, h_no_aclip = _one_row_contribution(bounded, 0, w0, bound, 1e9)
    assert h_no_aclip > 3.3 * sens["hessian"]
    # ...and without feature clipping it fails too.
    unbounded = np.append(raw, [[1.0]], axis=1)
    _, h_raw = _one_row_contribution(unbounded, 0, w0, bound, a_bound)
    assert h_raw > 2.9 * sens["hessian"]


def test_first_step_statistics_are_the_per_class_statistics_at_zero():
    """At W = 0 the K gradients and Hessians are functions of X~^T X~ and X~^T Y."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, D)).astype(np.float32), rng.integers(0, K, 40)
    head = DPNewton(bias_feature=0.5, residual_clip_fraction=1.0, hessian_clip_fraction=1.0)
    g, h = _exact(head, x, y, np.zeros((D + 1, K)), K)
    gram, sums = _first_step(head, x, y, K)
    np.testing.assert_allclose(g, 0.5 * sums.sum(1, keepdims=True) - sums, rtol=1e-4, atol=1e-4)
    for k in range(K):
        np.testing.assert_allclose(h[k], gram / 4, rtol=1e-4, atol=1e-5)
    # Clipping at W = 0 scales every example by the same public factors.
    clipped = DPNewton(bias_feature=0.5, residual_clip_fraction=0.3, hessian_clip_fraction=0.4)
    gc, hc = _exact(clipped, x, y, np.zeros((D + 1, K)), K)
    c_r, c_h = clipped.first_step_clip_factors(K)
    assert (c_r, c_h) == (pytest.approx(0.6, rel=1e-5), pytest.approx(0.4, rel=1e-5))
    np.testing.assert_allclose(gc / c_r, g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hc / c_h, h, rtol=1e-4, atol=1e-5)


# --- accounting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "epsilon,delta,steps,ratio",
    [(0.5, 1e-5, 3, 1.0), (1.0, 1e-5, 1, 1.0), (2.0, 1e-6, 5, 2.0), (8.0, 1e-5, 3, 0.5)],
)
def test_calibration_round_trip_pld(epsilon, delta, steps, ratio):
    head = DPNewton(num_steps=steps, hessian_noise_ratio=ratio).calibrate(
        epsilon=epsilon, delta=delta
    )
    spent = accounting.epsilon_of(head.dp_event(), delta, "pld")
    assert 0.99 * epsilon <= spent <= epsilon
    m = head.noise_multipliers()
    assert m["hessian"] == pytest.approx(ratio * m["gradient"])
    # 2T Gaussians compose to one Gaussian exactly: compare with the analytic one.
    single = accounting.gaussian_equivalent_multiplier([m["gradient"], m["hessian"]] * steps)
    analytic = dp_accounting.get_sigma_gaussian(epsilon, delta)
    assert analytic * 0.999 <= single <= analytic * 1.01


def test_event_structure_is_exact():
    head = DPNewton(num_steps=4, hessian_noise_ratio=3.0, noise_multiplier=2.0)
    event = head.dp_event()
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(2.0), dp_accounting.GaussianDpEvent(6.0)]
        ),
        4,
    )


def test_more_steps_need_more_noise_per_step():
    s1 = DPNewton(num_steps=1).calibrate(epsilon=1.0, delta=1e-5).noise_multiplier
    s4 = DPNewton(num_steps=4).calibrate(epsilon=1.0, delta=1e-5).noise_multiplier
    assert s4 == pytest.approx(2 * s1, rel=0.01)  # mu-GDP: sqrt(T)


def test_rdp_is_looser_than_pld_but_valid():
    pld = DPNewton(accountant="pld").calibrate(epsilon=1.0, delta=1e-5)
    rdp = DPNewton(accountant="rdp").calibrate(epsilon=1.0, delta=1e-5)
    assert rdp.noise_multiplier > pld.noise_multiplier
    assert accounting.epsilon_of(rdp.dp_event(), 1e-5, "rdp") <= 1.0


# --- noise ------------------------------------------------------------------------------


_RELEASE = DPNewton.release
_RELEASE_FIRST = DPNewton.release_first_step


def _capture_noise(monkeypatch, head, data, seed=0):
    """Run a real fit and record the noise actually added, by (release, class, step)."""
    draws = {}

    def spy(self, gradient, hessian, *, class_index, step, key, num_classes):
        g, h = _RELEASE(
            self,
            gradient,
            hessian,
            class_index=class_index,
            step=step,
            key=key,
            num_classes=num_classes,
        )
        for name, noisy, exact in (("gradient", g, gradient), ("hessian", h, hessian)):
            assert (name, class_index, step) not in draws  # one release per class per step
            draws[(name, class_index, step)] = noisy - np.asarray(exact, np.float64)
        return g, h

    def spy_first(self, gram, label_sums, *, key):
        a, b = _RELEASE_FIRST(self, gram, label_sums, key=key)
        assert ("gram", 0, 0) not in draws
        draws[("gram", 0, 0)] = a - np.asarray(gram, np.float64)
        for c, col in enumerate((b - np.asarray(label_sums, np.float64)).T):
            draws[("label_sums", c, 0)] = col
        return a, b

    monkeypatch.setattr(DPNewton, "release", spy)
    monkeypatch.setattr(DPNewton, "release_first_step", spy_first)
    head.fit(data, key=rk(seed))
    return draws


def _max_offdiag_corr(rows):
    c = np.corrcoef(np.stack(rows))
    return float(np.max(np.abs(c[~np.eye(len(c), dtype=bool)])))


@pytest.mark.parametrize("shared_first_step", [True, False])
def test_noise_is_independent_across_classes_and_steps(monkeypatch, shared_first_step):
    k, d, steps = 4, 60, 3
    data, _, _ = _toy(n=300, d=d, k=k)
    head = DPNewton(
        num_steps=steps,
        noise_multiplier=2.0,
        hessian_noise_ratio=1.5,
        shared_first_step=shared_first_step,
    )
    draws = _capture_noise(monkeypatch, head, data)
    per_class_steps = range(1, steps) if shared_first_step else range(steps)
    expected = {
        (r, c, t) for r in ("gradient", "hessian") for c in range(k) for t in per_class_steps
    }
    if shared_first_step:  # step 0: one Gram release, one label-sum column per class
        expected |= {("gram", 0, 0)} | {("label_sums", c, 0) for c in range(k)}
    assert set(draws) == expected
    sd = head.noise_stddevs(k)
    iu = np.triu_indices(d, 1)  # 1770 off-diagonal entries per matrix
    matrices = [v[iu] for key, v in draws.items() if key[0] in ("hessian", "gram")]
    vectors = [v for key, v in draws.items() if key[0] in ("gradient", "label_sums")]
    # Stated scales: symmetrised off-diagonal sd / sqrt(2); vectors sd.
    for name, v in draws.items():
        stated = sd[name[0]] / (2**0.5 if name[0] in ("hessian", "gram") else 1.0)
        got = np.std(v[iu] if v.ndim == 2 else v)
        assert got == pytest.approx(stated, rel=0.06 if v.ndim == 2 else 0.35), name
    # Independent draws: |corr| ~ 1/sqrt(1770) = 0.024 (vectors: 1/sqrt(60)); a shared
    # draw (the reference code's bug, across classes or across steps) gives 1.0.
    assert _max_offdiag_corr(matrices) < 0.12
    assert _max_offdiag_corr(vectors) < 0.6
    assert _max_offdiag_corr([matrices[0]] * 3) > 0.99
    # Another seed, other noise.
    other = _capture_noise(monkeypatch, head, data, seed=1)
    key = ("hessian", 0, steps - 1)
    assert _max_offdiag_corr([draws[key][iu], other[key][iu]]) < 0.12


# --- blocking, memory, streaming --------------------------------------------------------


def test_block_size_bounds_hessian_memory():
    d_aug, budget = 1665, 1e9  # ImageNet-scale: K = 1000, d = 1664 with bias
    block = hessian_class_block_size(
        augmented_dim=d_aug, num_classes=1000, max_hessian_bytes=budget
    )
    assert block * d_aug**2 * 4 <= budget < (block + 1) * d_aug**2 * 4 * 1.2
    assert 1000 * d_aug**2 * 4 > 10 * budget  # holding all K would break the budget
    assert hessian_class_block_size(augmented_dim=10, num_classes=7, max_hessian_bytes=1e9) == 7
    assert (
        hessian_class_block_size(
            augmented_dim=10, num_classes=7, max_hessian_bytes=1e9, hessian_class_block=3
        )
        == 3  # blocks 3, 3, 1 -> balanced 3, 3, 1 (ceil(7/3) = 3)
    )
    # balanced: 10 classes at most 4 per block -> 3 blocks of <= 4, sizes 4, 4, 2 -> 4
    assert (
        hessian_class_block_size(augmented_dim=10, num_classes=10, max_hessian_bytes=4 * 100 * 4)
        == 4
    )
    with pytest.raises(ValueError, match="max_hessian_bytes"):
        hessian_class_block_size(augmented_dim=100, num_classes=3, max_hessian_bytes=1000)


def test_blocked_fit_equals_unblocked_and_respects_the_budget(monkeypatch):
    k, d = 5, 12
    data, _, _ = _toy(n=400, d=d, k=k, chunk_rows=64)
    per_class = (d + 1) ** 2 * 4
    budget = 2.5 * per_class  # two classes per block
    shapes = []
    original = dp_newton.accumulate_chunk

    def spy(grad, hess, *args, **kwargs):
        shapes.append(hess.shape)
        return original(grad, hess, *args, **kwargs)

    monkeypatch.setattr(dp_newton, "accumulate_chunk", spy)
    common = dict(num_steps=3, noise_multiplier=0.5, bias_feature=1.0)
    blocked = DPNewton(max_hessian_bytes=budget, **common).fit(data, key=rk(3))
    blocked_shapes = list(shapes)
    assert {s[0] for s in blocked_shapes} <= {1, 2}
    assert all(math.prod(s) * 4 <= budget for s in blocked_shapes)
    # one pass per block per per-class step: 2 steps (after the shared first) x 3 blocks
    assert len(blocked_shapes) == 2 * 3 * data.num_chunks
    shapes.clear()
    whole = DPNewton(**common).fit(data, key=rk(3))
    assert {s[0] for s in shapes} == {k}
    np.testing.assert_allclose(blocked["weights"], whole["weights"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocked["bias"], whole["bias"], rtol=1e-5, atol=1e-6)


def test_streams_when_cache_exceeds_budget(monkeypatch):
    data, _, _ = _toy(n=300, d=6, k=3, chunk_rows=64)
    reads = []
    original = data.read_chunk
    monkeypatch.setattr(data, "read_chunk", lambda c: reads.append(c) or original(c))
    head = DPNewton(num_steps=2, noise_multiplier=1.0, hessian_class_block=2)
    cached = head.fit(data, key=rk(0))
    assert len(reads) == data.num_chunks  # read once into the cache
    reads.clear()
    streamed = dataclasses.replace(head, max_in_memory_bytes=0).fit(data, key=rk(0))
    # every pass re-reads the data, each chunk once per pass: one pass for the shared
    # first step, then one per block (2) per later step (1)
    assert reads == list(range(data.num_chunks)) * (1 + 2)
    np.testing.assert_allclose(streamed["weights"], cached["weights"], rtol=1e-6)


# --- limits: vanishing noise and growing epsilon -----------------------------------------


def _reference_newton(x, y, k, *, steps, lam, mu, eta, b0, rho, rho_h):
    """Plain numpy one-vs-all damped Newton on L2-normalised features, no noise.

    From step 1 on, residual rows are clipped to rho sqrt(k) and Hessian-weight
    rows to rho_h sqrt(k) / 4; step 0 is the unclipped Newton step from zero.
    """
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    xa = np.concatenate([xn, np.full((len(y), 1), b0)], axis=1)
    onehot = np.eye(k)[y]
    w = np.zeros((xa.shape[1], k))
    for t in range(steps):
        p = 1 / (1 + np.exp(-(xa @ w)))
        r = p - onehot
        a = p * (1 - p)
        if t > 0:
            r = r * np.minimum(1, rho * np.sqrt(k) / np.linalg.norm(r, axis=1, keepdims=True))
            a = a * np.minimum(1, rho_h * np.sqrt(k) / 4 / np.linalg.norm(a, axis=1, keepdims=True))
        w_next = w.copy()
        for c in range(k):
            g = xa.T @ r[:, c] + mu * w[:, c]
            h = xa.T @ (a[:, c : c + 1] * xa)
            w_next[:, c] = w[:, c] - eta * np.linalg.solve(h + (lam + mu) * np.eye(len(h)), g)
        w = w_next
    return w


@pytest.mark.parametrize("shared_first_step", [True, False])
def test_vanishing_noise_equals_plain_newton(shared_first_step):
    data, x, y = _toy(spread=1.5)
    head = DPNewton(
        num_steps=4,
        step_size=0.8,
        ridge_lambda=0.5,
        l2_penalty=0.1,
        bias_feature=0.7,
        residual_clip_fraction=0.3,
        hessian_clip_fraction=0.35,
        shared_first_step=shared_first_step,
        noise_multiplier=1e-9,
    )
    out = head.fit(data, key=rk(0))
    w = _reference_newton(x, y, 3, steps=4, lam=0.5, mu=0.1, eta=0.8, b0=0.7, rho=0.3, rho_h=0.35)
    np.testing.assert_allclose(out["weights"], w[:-1], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(out["bias"], 0.7 * w[-1], rtol=2e-3, atol=2e-3)


def test_many_noiseless_steps_reach_the_regularised_optimum():
    data, x, y = _toy(spread=1.5)
    mu = 1.0
    head = DPNewton(
        num_steps=15,
        ridge_lambda=0.0,
        l2_penalty=mu,
        bias_feature=1.0,
        residual_clip_fraction=1.0,
        hessian_clip_fraction=1.0,
        noise_multiplier=1e-9,
    )
    out = head.fit(data, key=rk(0))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    xa = np.concatenate([xn, np.ones((len(y), 1))], axis=1)
    wa = np.concatenate([out["weights"], out["bias"][None]], axis=0).astype(np.float64)
    grad = xa.T @ (1 / (1 + np.exp(-(xa @ wa))) - np.eye(3)[y]) + mu * wa
    assert np.linalg.norm(grad) < 1e-3 * np.linalg.norm(xa.T @ np.eye(3)[y])
    acc = np.mean(np.argmax(xn @ out["weights"] + out["bias"], 1) == y)
    assert acc > 0.85  # the toy classes overlap (spread 1.5)


def test_converges_to_nonprivate_as_epsilon_grows():
    data, x, y = _toy(n=1500, d=10, k=3, spread=1.5)
    limit = DPNewton(noise_multiplier=1e-9).fit(data, key=rk(0))["weights"]
    errors = []
    for eps in (0.5, 8.0, 50.0):
        head = DPNewton().calibrate(epsilon=eps, delta=1e-5)
        errs = [np.linalg.norm(head.fit(data, key=rk(s))["weights"] - limit) for s in range(3)]
        errors.append(np.median(errs))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 * np.linalg.norm(limit)


def test_outputs_predict_with_argmax_and_no_bias_option():
    data, x, y = _toy(n=800, d=8, k=3)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for b0 in (1.0, 0.0):
        out = DPNewton(bias_feature=b0).calibrate(epsilon=8.0, delta=1e-5).fit(data, key=rk(0))
        assert out["weights"].shape == (8, 3) and out["weights"].dtype == np.float32
        assert out["bias"].shape == (3,) and out["bias"].dtype == np.float32
        if b0 == 0:
            assert not out["bias"].any()
        assert np.mean(np.argmax(xn @ out["weights"] + out["bias"], 1) == y) > 0.9


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,match",
    [
        ({"l2_clip_norm": 0}, "l2_clip_norm must be > 0"),
        ({"feature_transform": "zca"}, r"feature_transform must be one of .*, got 'zca'"),
        ({"bias_feature": -1.0}, "bias_feature must be >= 0"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"num_steps": 2.5}, "num_steps must be an integer >= 1"),
        ({"step_size": 0.0}, "step_size must be > 0"),
        ({"residual_clip_fraction": 1.5}, r"residual_clip_fraction must be in \(0, 1\]"),
        ({"hessian_clip_fraction": 0.0}, r"hessian_clip_fraction must be in \(0, 1\]"),
        ({"shared_first_step": "yes"}, "shared_first_step must be true or false"),
        ({"hessian_noise_ratio": 0.0}, "hessian_noise_ratio must be > 0"),
        ({"hessian_class_block": 0}, "hessian_class_block must be an integer >= 1 or null"),
        ({"max_hessian_bytes": 0}, "max_hessian_bytes must be > 0"),
        ({"ridge_lambda": -1.0}, "ridge_lambda must be >= 0"),
        ({"l2_penalty": -1.0}, "l2_penalty must be >= 0"),
        ({"accountant": "moments"}, "accountant must be one of"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be > 0"),
    ],
)
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        DPNewton(**params)


def test_uncalibrated_head_refuses_to_fit():
    data, _, _ = _toy(n=50)
    with pytest.raises(ValueError, match="not calibrated"):
        DPNewton().fit(data, key=rk(0))
    with pytest.raises(ValueError, match="not calibrated"):
        DPNewton().dp_event()


def test_hyperparameters_exclude_noise():
    hp = DPNewton(noise_multiplier=3.0).hyperparameters()
    assert "noise_multiplier" not in hp and hp["num_steps"] == 3


# --- the block upper-triangle Hessians ---------------------------------------------------


def _full_product_accumulate(grad, hess, xa, labels, mask, weights, classes, **kw):
    """The previous kernel: every class's full (d+1) x (d+1) product, no symmetry used."""
    kw.pop("tile_rows", None)
    logits = xa @ weights
    r = dp_newton.clipped_residuals(
        logits, labels, num_classes=kw["num_classes"], residual_bound=kw["residual_bound"]
    )
    a = dp_newton.hessian_weights(logits, hessian_weight_bound=kw["hessian_weight_bound"])
    r, a = r * mask[:, None], a[:, classes] * mask[:, None]
    hess = hess + jnp.stack([(xa * a[:, j][:, None]).T @ xa for j in range(len(classes))])
    return grad + xa.T @ r[:, classes], hess


@pytest.mark.parametrize("tile_rows", [4, 5, 13, 256])
def test_triangular_hessians_equal_the_full_products(monkeypatch, tile_rows):
    k, d = 4, 12  # d + 1 = 13 augmented: tiles of 4 and 5 leave a ragged last tile
    data, x, y = _toy(n=300, d=d, k=k, chunk_rows=64)
    head = DPNewton(bias_feature=0.7, residual_clip_fraction=0.5, hessian_clip_fraction=0.4)
    w = np.random.default_rng(1).normal(size=(d + 1, k)).astype(np.float32)
    monkeypatch.setattr(dp_newton, "HESSIAN_TILE_ROWS", tile_rows)
    g, h = _exact(head, x, y, w, k, chunk_rows=64)
    # float64 reference: H_k = sum_i a_ik x~_i x~_i^T with the clipped weights of fit
    xa = np.asarray(
        dp_newton.augment_rows(
            jnp.asarray(x, jnp.float32), jnp.ones(len(y)), l2_clip_norm=1.0,
            transform="normalize", bias_feature=head.bias_value(),
        ),
        np.float64,
    )  # fmt: skip
    a = np.asarray(
        dp_newton.hessian_weights(
            jnp.asarray(xa @ w, jnp.float32), hessian_weight_bound=head.hessian_weight_bound(k)
        ),
        np.float64,
    )
    ref = np.einsum("nk,ni,nj->kij", a, xa, xa)
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, np.swapaxes(h, 1, 2), rtol=1e-6, atol=1e-6)  # mirrored
    monkeypatch.setattr(dp_newton, "accumulate_chunk", _full_product_accumulate)
    g_old, h_old = _exact(head, x, y, w, k, chunk_rows=64)
    np.testing.assert_allclose(h, h_old, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, g_old, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shared_first_step", [True, False])
def test_triangular_hessians_leave_the_reproducible_fit_unchanged(monkeypatch, shared_first_step):
    data, _, _ = _toy(n=500, d=10, k=4, chunk_rows=128)
    head = DPNewton(num_steps=3, bias_feature=0.5, shared_first_step=shared_first_step).calibrate(
        epsilon=2.0, delta=1e-5
    )
    monkeypatch.setattr(dp_newton, "HESSIAN_TILE_ROWS", 4)
    new = head.fit(data, key=rk(11, "tri"))
    monkeypatch.setattr(dp_newton, "accumulate_chunk", _full_product_accumulate)
    old = head.fit(data, key=rk(11, "tri"))
    for name in ("weights", "bias"):
        np.testing.assert_allclose(new[name], old[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(new["weights"], 0)
