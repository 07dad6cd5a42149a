"""Private feature centring: the mean release's sensitivity, the per-row bound after centring
by any mean, the composed event and its calibration, and the mean's own noise key."""

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.heads import make_head
from pipeline_lib.privacy import accounting, centering, noise
from pipeline_lib.privacy.clipping import FEATURE_TRANSFORMS, bound_rows

D = 6
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


def _data(x: np.ndarray) -> InMemoryFeatures:
    return InMemoryFeatures(x, np.zeros(len(x), np.int32), num_classes=2, chunk_rows=4)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.just(D)), elements=finite),
    extra=hnp.arrays(np.float32, (D,), elements=finite),
    clip=st.floats(0.01, 100.0),
    transform=st.sampled_from(FEATURE_TRANSFORMS),
)
def test_adding_one_row_moves_the_bounded_sum_by_at_most_c(x, extra, clip, transform):
    kw = dict(l2_clip_norm=clip, transform=transform)
    without = centering.bounded_sum(_data(x), **kw)
    with_row = centering.bounded_sum(_data(np.vstack([x, extra[None]])), **kw)
    # float32 chunk sums accumulated in float64: allow rounding of the other rows' sum only
    slack = 1e-6 * clip * (len(x) + 1)
    assert np.linalg.norm(with_row - without) <= clip + slack


@settings(max_examples=80, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.just(D)), elements=finite),
    center=hnp.arrays(np.float32, (D,), elements=finite),
    clip=st.floats(0.01, 100.0),
    transform=st.sampled_from(FEATURE_TRANSFORMS),
)
def test_every_centred_row_is_bounded_for_any_released_mean(x, center, clip, transform):
    """The head's bound holds whatever mu~ is: its sensitivity analysis is unchanged."""
    rows = centering.center_rows(x, center, l2_clip_norm=clip, transform=transform)
    bounded = np.asarray(bound_rows(rows, clip, transform))
    assert np.all(np.linalg.norm(bounded.astype(np.float64), axis=1) <= clip)


def test_the_released_mean_is_the_bounded_mean_plus_noise_from_its_own_key():
    rng = np.random.default_rng(0)
    x = (rng.random((50, D)) * 5).astype(np.float32)
    key = noise.NoiseKey.reproducible(1, "centering-test")
    mean = centering.release_mean(
        _data(x), l2_clip_norm=1.0, transform="normalize", noise_multiplier=3.0, key=key
    )
    exact = np.asarray(bound_rows(x, 1.0, "normalize"), np.float64).sum(0)
    want_noise = noise.gaussian(key.child("center"), centering.CENTER_RELEASE, (D,), 3.0)
    np.testing.assert_allclose(mean, (exact + np.asarray(want_noise)) / 50, rtol=1e-5)
    # not the base key's draw of the same release
    base_noise = noise.gaussian(key, centering.CENTER_RELEASE, (D,), 3.0)
    assert not np.allclose(mean, (exact + np.asarray(base_noise)) / 50, rtol=1e-3)


def test_the_mean_key_differs_from_every_other_key_of_a_run():
    key = noise.NoiseKey.reproducible(0, "run")
    center = key.child(centering.CENTER_KEY_LABEL)
    others = [key, key.child("selection")] + [
        key.child(label, g) for label in ("cand", "pub", "trial") for g in range(5)
    ]
    assert all(center != k for k in others)
    # per-candidate keys get their own mean keys too
    cand_centers = {key.child("cand", g).child("center") for g in range(5)}
    assert len(cand_centers | {center}) == 6
    # and its draw is not any head release's draw with the run's key
    releases = ["dp_ls/xtx", "dp_ls/xty", "dp_fc/covariance", "dp_fc/gradient",
                "dp_newton/gradient", "dp_newton/hessian", "dp_newton/gram",
                "dp_newton/label_sums", "dp_sgd/gradient"]  # fmt: skip
    mine = np.asarray(noise.gaussian(center, centering.CENTER_RELEASE, (64,), 1.0))
    for r in releases:
        theirs = np.asarray(noise.gaussian(key, r, (64,), 1.0))
        assert abs(np.corrcoef(mine, theirs)[0, 1]) < 0.5, r


@pytest.mark.parametrize("eps", [1.0, 3.0])
@pytest.mark.parametrize("method,hp", [("dp_ls", {}), ("dp_newton", {"num_steps": 2})])
def test_calibration_round_trip(method, hp, eps):
    head = make_head(method, {**hp, "center": True})
    cal = head.calibrate(epsilon=eps, delta=1e-5, num_examples=60000)
    event = cal.dp_event()
    assert isinstance(event, dp_accounting.ComposedDpEvent)
    first, rest = event.events
    z = dp_accounting.get_sigma_gaussian(eps, 1e-5)
    assert first == dp_accounting.GaussianDpEvent(z / math.sqrt(centering.DEFAULT_SHARE))
    assert rest == cal.head.dp_event()
    spent = accounting.epsilon_of(event, 1e-5, "pld")
    assert spent <= eps and spent >= 0.99 * eps
    # Gaussian heads: the head keeps exactly 1 - share of mu^2, so t = 1/sqrt(1 - share)
    alone = make_head(method, hp).calibrate(epsilon=eps, delta=1e-5, num_examples=60000)
    ratio = cal.noise_multiplier / alone.noise_multiplier
    assert ratio == pytest.approx(1 / math.sqrt(1 - centering.DEFAULT_SHARE), rel=5e-3)
    assert cal.noise_multipliers()["center"] == first.noise_multiplier


def test_calibration_with_a_poisson_sampled_head_spends_at_most_the_target():
    head = make_head("dp_fc", {"batch_size": 1000, "num_steps": 20, "center": True})
    cal = head.calibrate(epsilon=2.0, delta=1e-5, num_examples=20000)
    spent = accounting.epsilon_of(cal.dp_event(), 1e-5, "pld")
    assert 0.99 * 2.0 <= spent <= 2.0
    sampled = cal.dp_event().events[1].events[1].event
    assert sampled == dp_accounting.PoissonSampledDpEvent(
        0.05, dp_accounting.GaussianDpEvent(cal.noise_multipliers()["gradient"])
    )


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="center_share"):
        make_head("dp_ls", {"center_share": 0.1})  # without center: true
    with pytest.raises(ValueError, match="center_share must be a number in"):
        make_head("dp_ls", {"center": True, "center_share": 1.5})
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        make_head("nonprivate_ridge", {"center": True})
    plain = make_head("dp_ls", {})
    assert make_head("dp_ls", {"center": False}) == plain  # off: the plain head itself
    assert "center" not in plain.hyperparameters()
