import math

import dp_accounting
import numpy as np
import pytest

from pipeline_lib.heads import make_head
from pipeline_lib.privacy import accounting, events, noise
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


# ------------------------------------------------------------------ repeat and select


def _hand_rdp_tnb(orders, rdp, *, eta, gamma, mean):
    """Papernot & Steinke, Theorem 2, written out: for every order lam > 1,
    eps'(lam) = eps(lam) + (1 + eta) min_lh [(1 - 1/lh) eps(lh) + log(1/gamma)/lh]
                + log(E K)/(lam - 1),  then made monotone in lam."""
    orders, rdp = np.asarray(orders, float), np.asarray(rdp, float)
    inner = min(
        (1 - 1 / lh) * e + math.log(1 / gamma) / lh for lh, e in zip(orders, rdp, strict=True)
    )
    out = np.array(
        [
            e + (1 + eta) * inner + math.log(mean) / (lam - 1) if lam > 1 else np.inf
            for lam, e in zip(orders, rdp, strict=True)
        ]
    )
    return np.array([out[orders >= lam].min() for lam in orders])


@pytest.mark.parametrize("eta,mean", [(1.0, 10.0), (0.5, 4.0)])
def test_repeat_and_select_event_matches_the_paper_by_hand(eta, mean):
    from dp_accounting import rdp

    sigma, delta = 4.0, 1e-5
    acc = rdp.RdpAccountant()
    orders = np.asarray(acc._orders, float)
    base = orders / (2 * sigma**2)  # RDP of a Gaussian with multiplier sigma
    gamma = tn.tnb_gamma(eta, mean)
    hand = _hand_rdp_tnb(orders, base, eta=eta, gamma=gamma, mean=mean)
    want, _ = rdp.rdp_privacy_accountant.compute_epsilon(orders, hand, delta)
    acc.compose(events.repeat_and_select_event(events.gaussian_event(sigma), mean, eta))
    assert acc.get_epsilon(delta) == pytest.approx(want, rel=1e-9)
    # and the calibration hits the target from below
    heads = [make_head("dp_ls", {"ridge_noise_factor": f}) for f in (0.1, 1.0)]
    rs = tn.calibrate_repeat_and_select(
        heads, epsilon=2.0, delta=delta, num_examples=10_000, mean=mean, shape=eta
    )
    assert 0.99 * 2.0 <= rs.spent_epsilon <= 2.0
    assert rs.event.mean == mean and rs.event.shape == eta


def test_tnb_gamma_matches_dp_accounting():
    from dp_accounting.rdp import rdp_privacy_accountant as r

    for eta, mean in ((1.0, 10.0), (0.5, 3.0), (2.0, 30.0), (0.0, 5.0)):
        assert tn.tnb_gamma(eta, mean) == pytest.approx(
            r._gamma_truncated_negative_binomial(eta, mean), rel=1e-6
        )


@pytest.mark.parametrize(
    "law,shape,mean",
    [
        ("geometric", None, 10.0),
        ("logarithmic", None, 5.0),
        ("poisson", None, 4.0),
        ("truncated_negative_binomial", 0.5, 6.0),
    ],
)
def test_number_of_trials_follows_the_declared_law(law, shape, mean):
    """Chi-square goodness of fit of 6000 draws (bins with >= 5 expected)."""
    from scipy import stats

    eta = tn.trials_shape(law, shape)
    draws = np.array([tn.draw_trials(rk(i), mean=mean, shape=eta) for i in range(6000)])
    top = int(np.quantile(draws, 0.99))
    edges = np.arange(0, top + 1)
    pmf = tn.trials_pmf(edges, mean=mean, shape=eta)
    observed = np.array([np.sum(draws == k) for k in edges] + [np.sum(draws > top)])
    expected = np.append(pmf, max(0.0, 1 - pmf.sum())) * len(draws)
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] < 5:
        obs, exp = np.append(obs[:-2], obs[-2:].sum()), np.append(exp[:-2], exp[-2:].sum())
    assert abs(draws.mean() - mean) < 5 * draws.std() / math.sqrt(len(draws))
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
    if law != "poisson":
        assert draws.min() >= 1  # truncated laws always run a trial


def test_repeat_and_select_cost_does_not_grow_with_the_grid():
    """With the same mean number of trials, the noise of every trial is the same for
    G = 3 and 30 candidates; composition's grows like sqrt(G)."""
    factors, joint = [], []
    for g in (3, 30):
        heads = [make_head("dp_ls", {"ridge_noise_factor": 0.1 * (i + 1)}) for i in range(g)]
        rs = tn.calibrate_repeat_and_select(
            heads, epsilon=1.0, delta=1e-5, num_examples=50_000, mean=10.0, shape=1.0
        )
        factors.append(rs.heads[0].noise_multiplier)
        joint.append(
            tn.calibrate_jointly(
                heads, epsilon=1.0, delta=1e-5, accountant="pld", num_examples=50_000
            )
            .heads[0]
            .noise_multiplier
        )
    assert max(factors) / min(factors) < 1.01
    assert joint[1] > 2.5 * joint[0] and factors[1] < joint[1] / 2


def test_repeat_and_select_refuses_grids_that_change_a_sampled_event():
    heads = [make_head("dp_sgd", {"batch_size": b}) for b in (100, 200)]
    with pytest.raises(ValueError, match="selection: private"):
        tn.calibrate_repeat_and_select(
            heads, epsilon=1.0, delta=1e-5, num_examples=5000, mean=4.0, shape=1.0
        )
    same = [make_head("dp_sgd", {"batch_size": 100, "learning_rate": lr}) for lr in (1.0, 4.0)]
    rs = tn.calibrate_repeat_and_select(
        same, epsilon=1.0, delta=1e-5, num_examples=5000, mean=4.0, shape=1.0
    )
    assert rs.spent_epsilon <= 1.0
