"""Empirical privacy audits: the harness itself, then the real heads.

Each head audit runs the real release/fit code many times on D and on
D + one canary, scores every output with an attacker's statistic, and checks
that the empirical epsilon lower bound (95% confidence) stays below the
claimed epsilon, while the same audit of a deliberately broken copy (noise
multipliers divided by 10) exceeds it. The second half proves the audit has
the power to catch a real bug at these sample sizes.
"""

import dataclasses
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.heads.dp_ls import DPLeastSquares
from pipeline_lib.heads.stats import compute_stats
from pipeline_lib.privacy.audit import (
    audit,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
)
from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private

DELTA = 1e-5

# --------------------------------------------------------------------------
# The harness


def test_clopper_pearson_zero_successes_closed_form():
    # k = 0: P[Bin(n, p) = 0] = (1 - p)^n = alpha  =>  p = 1 - alpha^(1/n)
    for n in (1, 10, 500):
        np.testing.assert_allclose(clopper_pearson_upper(0, n, 0.025), 1 - 0.025 ** (1 / n))
    assert clopper_pearson_upper(7, 7, 0.05) == 1.0


@pytest.mark.parametrize("n,alpha", [(20, 0.025), (150, 0.05)])
def test_clopper_pearson_coverage_is_at_least_nominal(n, alpha):
    """Exact coverage P_p[upper(K) >= p] over K ~ Bin(n, p), for many p."""
    k = np.arange(n + 1)
    upper = clopper_pearson_upper(k, n, alpha)
    assert np.all(np.diff(upper) > 0)
    for p in np.linspace(0.001, 0.999, 97):
        coverage = stats.binom.pmf(k, n, p)[upper >= p].sum()
        assert coverage >= 1 - alpha - 1e-9, (p, coverage)


def test_epsilon_from_rates():
    e = math.e
    assert epsilon_from_rates(1 / (1 + e), 1 / (1 + e), 0.0) == pytest.approx(1.0)
    # direction does not matter: the bound uses both (S and its complement)
    assert epsilon_from_rates(0.01, 0.5, 0.0) == pytest.approx(math.log(50))
    assert epsilon_from_rates(0.5, 0.01, 0.0) == pytest.approx(math.log(50))
    assert epsilon_from_rates(0.5, 0.5, 0.0) == 0.0  # a coin flip proves nothing
    assert epsilon_from_rates(0.9, 0.9, 0.0) == 0.0  # clipped at 0, never negative


def randomized_response(eps, n, rng):
    """(eps, 0)-DP with a tight tradeoff: log((1 - FNR) / FPR) = eps exactly."""
    p = 1 / (1 + math.exp(eps))
    return (rng.random(n) > 1 - p).astype(float), (rng.random(n) > p).astype(float)


def test_bound_is_a_valid_confidence_bound_on_a_tight_mechanism():
    """Point estimates exceed the true eps half the time; the 95% bound must not."""
    rng = np.random.default_rng(0)
    eps, reps = 1.5, 200
    bounds, point = [], []
    for _ in range(reps):
        without, with_ = randomized_response(eps, 2000, rng)
        r = epsilon_lower_bound(without, with_, delta=0.0)
        bounds.append(r.epsilon_lower_bound)
        point.append(epsilon_from_rates(r.fpr, r.fnr, 0.0))
    bounds, point = np.array(bounds), np.array(point)
    assert np.mean(bounds > eps) <= 0.05
    assert np.mean(point > eps) > 0.3  # the plug-in estimate is not a bound
    assert np.median(bounds) > 0.75 * eps  # and the bound is not vacuous


def test_identical_distributions_give_zero():
    """A mechanism that ignores the canary is 0-DP: the bound is 0 w.p. >= 95%."""
    rng = np.random.default_rng(1)
    hits = [
        epsilon_lower_bound(
            rng.normal(size=100), rng.normal(size=100), delta=DELTA
        ).epsilon_lower_bound
        for _ in range(200)
    ]
    assert np.mean(np.array(hits) > 0) <= 0.05


def test_threshold_and_direction_are_reported():
    rng = np.random.default_rng(2)
    r = epsilon_lower_bound(rng.normal(3, 1, 2000), rng.normal(0, 1, 2000), delta=DELTA)
    assert r.direction == -1  # the canary lowers the score here
    assert r.epsilon_lower_bound > 1
    assert r.num_without == r.num_with == 1000
    assert r.fpr_upper >= r.fpr and r.fnr_upper >= r.fnr
    assert r.epsilon_lower_bound <= r.max_detectable_epsilon


def test_bad_inputs_are_rejected():
    ok = np.zeros(10)
    with pytest.raises(ValueError, match="scores_with"):
        epsilon_lower_bound(ok, np.array([0.0, np.nan, 1, 2, 3]), delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(ok, ok, delta=1.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(ok, ok, delta=DELTA, confidence=1.0)
    with pytest.raises(ValueError, match="trials"):
        audit(lambda include, seed: 0.0, trials=2, delta=DELTA)


def gaussian_mechanism(sigma):
    """Release 1{canary} + N(0, sigma^2): sensitivity 1, noise multiplier sigma."""

    def run(include_canary: bool, seed: int) -> float:
        return float(include_canary) + sigma * np.random.default_rng(seed).standard_normal()

    return run


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_gaussian_mechanism_honest_and_broken(epsilon):
    sigma = dp_accounting.get_sigma_gaussian(epsilon, DELTA)
    honest = audit(gaussian_mechanism(sigma), trials=3000, delta=DELTA)
    broken = audit(gaussian_mechanism(sigma / 10), trials=3000, delta=DELTA)
    assert honest.epsilon_lower_bound <= epsilon
    assert broken.epsilon_lower_bound > epsilon
    assert broken.epsilon_lower_bound > honest.epsilon_lower_bound + 1


def test_gaussian_mechanism_many_samples_is_still_below_epsilon():
    """With 200k runs a side the bound gets close to the truth, and stays under it."""
    epsilon = 1.0
    sigma = dp_accounting.get_sigma_gaussian(epsilon, DELTA)
    rng = np.random.default_rng(3)
    n = 200_000
    r = epsilon_lower_bound(rng.normal(0, sigma, n), rng.normal(1, sigma, n), delta=DELTA)
    assert 0.4 * epsilon < r.epsilon_lower_bound <= epsilon


# --------------------------------------------------------------------------
# Heads: honest versus broken (noise multipliers / 10)


def broken_copy(head):
    """The calibrated head with every noise multiplier divided by 10."""
    broken = dataclasses.replace(head, noise_multiplier=head.noise_multiplier / 10)
    for key, value in head.noise_multipliers().items():
        assert broken.noise_multipliers()[key] == pytest.approx(value / 10)
    return broken


def audit_honest_and_broken(name, make_run, head, *, epsilon, trials):
    honest = audit(make_run(head), trials=trials, delta=DELTA)
    broken = audit(make_run(broken_copy(head)), trials=trials, delta=DELTA, seed0=10**6)
    print(
        f"{name} eps={epsilon} trials={trials}: honest eps_lb={honest.epsilon_lower_bound:.3f}, "
        f"broken eps_lb={broken.epsilon_lower_bound:.3f}, "
        f"max detectable={honest.max_detectable_epsilon:.3f}"
    )
    assert honest.max_detectable_epsilon > epsilon + 1  # the audit could have flagged it
    assert honest.epsilon_lower_bound < epsilon
    assert broken.epsilon_lower_bound > epsilon


# --------------------------------------------------------------------------
# DP-LS: the real release code


def _dataset(n=20, d=3, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, n).astype(np.int32)


def _with_canary(x, y, canary_x, canary_y):
    return np.concatenate([x, canary_x[None]]), np.concatenate([y, [canary_y]]).astype(np.int32)


def dp_ls_mechanism(head: DPLeastSquares, *, d=3, k=2):
    """Release DP-LS statistics of D or D + canary; score = the Gaussian log-LR.

    The canary's raw feature has norm 100 (clipping to C must be what limits
    it). Its clipped version x_c moves X^T X by x_c x_c^T and column y_c of
    X^T Y by x_c. For Gaussian noise the log-likelihood ratio is linear in the
    released entries: with the symmetrised Gram noise (variance sigma_1^2 on
    the diagonal, sigma_1^2 / 2 off it) it is

        x_c^T G x_c / sigma_1^2 + x_c^T (X^T Y)[:, y_c] / sigma_2^2  (+ const),

    the most powerful test (Neyman-Pearson), so the attack realises the
    composed Gaussian mechanism's full tradeoff curve.
    """
    x, y = _dataset(d=d, k=k)
    c = head.l2_clip_norm
    direction = np.ones(d) / math.sqrt(d)
    canary_x, canary_y = (100.0 * direction).astype(np.float32), 1
    xc, yc = _with_canary(x, y, canary_x, canary_y)
    stats_without = compute_stats(
        InMemoryFeatures(x, y, num_classes=k), l2_clip_norm=c, transform=head.feature_transform
    )
    stats_with = compute_stats(
        InMemoryFeatures(xc, yc, num_classes=k), l2_clip_norm=c, transform=head.feature_transform
    )
    # clipping is enforced: the canary moved the Gram trace by C^2, not 100^2
    added = np.trace(stats_with.xtx) - np.trace(stats_without.xtx)
    assert added == pytest.approx(c**2, rel=1e-4)

    m = head.noise_multipliers()
    var_xtx, var_xty = (m["xtx"] * c**2) ** 2, (m["xty"] * c) ** 2
    attack = c * direction  # what the attacker knows the clipped canary to be

    def run(include_canary: bool, seed: int) -> float:
        noisy = head.release(stats_with if include_canary else stats_without, key=rk(seed))
        return float(
            attack @ noisy.xtx @ attack / var_xtx + attack @ noisy.xty[:, canary_y] / var_xty
        )

    return run


@pytest.mark.slow
def test_dp_ls_release_audit():
    """Both releases, audited together with the Neyman-Pearson attack.

    With the likelihood-ratio score the canary's direction does not matter
    (its signal is ||x_c||^4 / sigma_1^2 + ||x_c||^2 / sigma_2^2); what does
    is that clipping holds it to ||x_c|| = C.
    """
    epsilon = 2.0
    head = DPLeastSquares(l2_clip_norm=1.0, feature_transform="clip").calibrate(
        epsilon=epsilon, delta=DELTA
    )
    audit_honest_and_broken("dp_ls", dp_ls_mechanism, head, epsilon=epsilon, trials=750)


# --------------------------------------------------------------------------
# Logistic-loss heads: fit many times on D and D + canary, score the weights
#
# The canary has raw norm 100 (clipping must bound it) and label 1. With K = 2
# its clipped gradient at W = 0 moves column 1 of W along its feature u and
# column 0 against it, so the score u . (W[:, 1] - W[:, 0]) carries its
# signal. The difference of the two columns also cancels any noise shared by
# the classes (the reference code's bug): such a bug would be flagged.

CANARY_LABEL = 1


def circle_data(n, seed=0):
    """n/2 features spread in angle (a well-conditioned Gram/Hessian), each with both labels.

    Pairing the labels makes D's gradient vanish at W = 0, so D adds no
    variance to the score through the noisy preconditioner or Hessian.
    """
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n // 2)
    x = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
    return np.repeat(x, 2, axis=0), np.tile(np.array([0, 1], np.int32), n // 2)


def axis_data(n, seed=0):
    """Features on +-e1 only: D's gradients never touch the e2 row of W."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 2), np.float32)
    x[:, 0] = rng.choice([-1.0, 1.0], n)
    return x, rng.integers(0, 2, n).astype(np.int32)


def neighbours(x, y, direction):
    """(D, D + canary) as InMemoryFeatures; the canary's raw norm is 100."""
    xc, yc = _with_canary(x, y, (100.0 * direction).astype(np.float32), CANARY_LABEL)
    return InMemoryFeatures(x, y, num_classes=2), InMemoryFeatures(xc, yc, num_classes=2)


def fit_mechanism(head_without, head_with, data_without, data_with, direction):
    def run(include_canary: bool, seed: int) -> float:
        if include_canary:
            w = head_with.fit(data_with, key=rk(seed))["weights"]
        else:
            w = head_without.fit(data_without, key=rk(seed))["weights"]
        return float(direction @ (w[:, 1] - w[:, 0]))

    return run


@pytest.mark.slow
def test_dp_newton_fit_audit():
    """One Newton step (gradient + Hessian releases), bias feature 0.25.

    The bias column shares the canary's clipped gradient; a small b0 keeps
    most of it on the feature weights, where the score looks.
    """
    dp_newton = pytest.importorskip("pipeline_lib.heads.dp_newton")
    epsilon = 2.0
    head = dp_newton.DPNewton(num_steps=1, bias_feature=0.25, hessian_noise_ratio=2.0).calibrate(
        epsilon=epsilon, delta=DELTA
    )
    u = np.array([0.6, 0.8])
    d0, d1 = neighbours(*circle_data(100), u)

    def make_run(h):
        return fit_mechanism(h, h, d0, d1, u)

    audit_honest_and_broken("dp_newton", make_run, head, epsilon=epsilon, trials=400)


@pytest.mark.slow
def test_dp_fc_fit_audit():
    """Covariance release + 2 full-batch preconditioned gradient steps."""
    dp_fc = pytest.importorskip("pipeline_lib.heads.dp_fc")
    epsilon = 2.0
    head = dp_fc.DPFeatureCovariance(
        num_steps=2, bias_scale=0.25, l2_grad_clip=0.5, covariance_share=0.25
    ).calibrate(epsilon=epsilon, delta=DELTA)
    u = np.array([0.6, 0.8])
    d0, d1 = neighbours(*circle_data(100), u)

    def make_run(h):
        return fit_mechanism(h, h, d0, d1, u)

    audit_honest_and_broken("dp_fc", make_run, head, epsilon=epsilon, trials=400)


@pytest.mark.slow
def test_dp_sgd_fit_audit():
    """Two Poisson-sampled DP-SGD steps with momentum.

    q = batch_size / N comes from the data's size, so D + canary (N + 1
    examples) runs with the same noise multiplier and q' = B / (N + 1) < q
    and the same number of steps: no more private than what the accountant
    was told for D. D lies on the e1 axis, so only noise and the canary move
    the e2 row of W; with B = N the canary is sampled at each step w.p. N/(N+1).
    """
    dp_sgd = pytest.importorskip("pipeline_lib.heads.dp_sgd")
    epsilon, n = 2.0, 20
    head = dp_sgd.DPSGDLogistic(
        batch_size=n, epochs=1.5, l2_clip_norm=4.0, l2_grad_clip=0.5, learning_rate=1.0
    ).calibrate(epsilon=epsilon, delta=DELTA, num_examples=n)
    assert head.num_steps(n) == head.num_steps(n + 1) == 2
    e2 = np.array([0.0, 1.0])
    d0, d1 = neighbours(*axis_data(n), e2)

    def make_run(h):
        return fit_mechanism(h, dataclasses.replace(h, num_examples=n + 1), d0, d1, e2)

    audit_honest_and_broken("dp_sgd", make_run, head, epsilon=epsilon, trials=400)


@pytest.mark.slow
def test_audit_flags_noise_shared_across_classes(monkeypatch):
    """The reference code's bug (one noise draw for every class), put into DP-FC.

    At the honest noise multipliers the class-difference score cancels the
    shared gradient noise, so the audit flags the head at once.
    """
    dp_fc = pytest.importorskip("pipeline_lib.heads.dp_fc")
    from pipeline_lib.privacy import noise

    epsilon = 2.0
    head = dp_fc.DPFeatureCovariance(
        num_steps=2, bias_scale=0.25, l2_grad_clip=0.5, covariance_share=0.25
    ).calibrate(epsilon=epsilon, delta=DELTA)
    u = np.array([0.6, 0.8])
    d0, d1 = neighbours(*circle_data(100), u)
    per_class_normal = noise.per_class_normal

    def shared_normal(base, step, *, num_classes, dim):
        row = per_class_normal(base, step, num_classes=1, dim=dim)
        return jnp.tile(row, (num_classes, 1))

    jax.clear_caches()  # the update is jitted: retrace it with the bug
    monkeypatch.setattr(noise, "per_class_normal", shared_normal)
    try:
        buggy = audit(fit_mechanism(head, head, d0, d1, u), trials=200, delta=DELTA)
    finally:
        jax.clear_caches()  # and never leave the buggy trace behind
    print(f"dp_fc with shared class noise: eps_lb={buggy.epsilon_lower_bound:.3f}")
    assert buggy.epsilon_lower_bound > epsilon
