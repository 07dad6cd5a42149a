import math

import dp_accounting
import numpy as np
import pytest

from pipeline_lib.heads import make_head
from pipeline_lib.privacy import accounting, noise
from pipeline_lib.privacy import selection as tn
from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private


def test_joint_calibration_spends_the_target_and_no_more():
    heads = [make_head("dp_ls", {"ridge_lambda": r}) for r in (0.1, 1.0, 10.0)]
    joint = tn.calibrate_jointly(
        heads, epsilon=2.0, delta=1e-5, accountant="pld", num_examples=10000
    )
    assert 0.99 * 2.0 <= joint.spent_epsilon <= 2.0
    assert accounting.epsilon_of(joint.event, 1e-5, "pld") == joint.spent_epsilon
    # Gaussian-only candidates: G + 1 equal mechanisms compose like one Gaussian
    # with multiplier t s / sqrt(G + 1), so t = sqrt(G + 1) (up to PLD discretization).
    assert joint.factor == pytest.approx(math.sqrt(4), rel=0.02)
    for eps_alone in joint.candidate_epsilons:
        assert eps_alone < 2.0 / 1.5  # each candidate alone costs much less than the total


def test_mixed_candidates_and_sampled_events_calibrate():
    heads = [make_head("dp_sgd", {"batch_size": 200, "epochs": e}) for e in (1, 2)]
    joint = tn.calibrate_jointly(
        heads, epsilon=1.0, delta=1e-5, accountant="pld", num_examples=5000
    )
    assert joint.spent_epsilon <= 1.0
    # more epochs, same share of the budget: more noise per step
    assert joint.heads[1].noise_multiplier > joint.heads[0].noise_multiplier
    assert all(h.num_examples == 5000 for h in joint.heads)


def test_noisy_selection_uses_its_own_key_and_stated_scale():
    counts = [100, 120, 110]
    picks = [tn.noisy_selection(counts, noise_multiplier=1e-6, key=rk(s))[0] for s in range(5)]
    assert picks == [1] * 5  # negligible noise: the argmax
    # std = multiplier * sqrt(G), from the key (seed, "tuning/validation_scores")
    z = np.stack(
        [tn.noisy_selection([0] * 3, noise_multiplier=2.0, key=rk(s))[1] for s in range(400)]
    )
    assert np.std(z) == pytest.approx(2.0 * math.sqrt(3), rel=0.1)
    expected = (
        2.0
        * math.sqrt(3)
        * np.asarray(noise.gaussian(rk(7), "tuning/validation_scores", (3,), 1.0))
    )
    np.testing.assert_allclose(
        tn.noisy_selection([0] * 3, noise_multiplier=2.0, key=rk(7))[1], expected, rtol=1e-5
    )


def test_selection_sensitivity_accounting_matches_gaussian():
    """The selection event is Gaussian(t z): per unit L2 sensitivity sqrt(G)."""
    heads = [make_head("dp_ls")] * 2
    joint = tn.calibrate_jointly(
        heads, epsilon=1.0, delta=1e-5, accountant="pld", num_examples=10**4
    )
    sel = joint.event.events[-1]
    assert isinstance(sel, dp_accounting.GaussianDpEvent)
    assert sel.noise_multiplier == pytest.approx(joint.selection_noise_multiplier)
