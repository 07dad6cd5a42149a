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
        noisy = head.release(stats_with if include_canary else stats_without, seed=seed)
        return float(
            attack @ noisy.xtx @ attack / var_xtx + attack @ noisy.xty[:, canary_y] / var_xty
        )

    return run


@pytest.mark.slow
def test_dp_ls_release_audit():
    epsilon, trials = 2.0, 1000
    head = DPLeastSquares(l2_clip_norm=1.0, feature_transform="clip").calibrate(
        epsilon=epsilon, delta=DELTA
    )
    honest = audit(dp_ls_mechanism(head), trials=trials, delta=DELTA)
    broken_head = dataclasses.replace(head, noise_multiplier=head.noise_multiplier / 10)
    broken = audit(dp_ls_mechanism(broken_head), trials=trials, delta=DELTA, seed0=10**6)
    print(f"dp_ls eps={epsilon}: honest {honest}, broken {broken}")
    assert honest.max_detectable_epsilon > epsilon + 2  # the audit could have flagged it
    assert honest.epsilon_lower_bound < epsilon
    assert broken.epsilon_lower_bound > epsilon
