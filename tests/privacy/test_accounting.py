import dp_accounting
import pytest

from pipeline_lib.heads.dp_ls import DPLeastSquares
from pipeline_lib.privacy import accounting

BUDGETS = [(0.25, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-5)]


@pytest.mark.parametrize("epsilon,delta", BUDGETS)
def test_dp_ls_calibration_round_trip_pld(epsilon, delta):
    head = DPLeastSquares(accountant="pld").calibrate(epsilon=epsilon, delta=delta)
    spent = accounting.epsilon_of(head.dp_event(), delta, "pld")
    assert spent <= epsilon
    assert spent >= 0.99 * epsilon  # tight: within 1% of the target


@pytest.mark.parametrize("epsilon,delta", BUDGETS)
def test_dp_ls_matches_analytic_gaussian(epsilon, delta):
    """Two composed Gaussians (s, s) are exactly one Gaussian with s / sqrt(2)."""
    head = DPLeastSquares(accountant="pld").calibrate(epsilon=epsilon, delta=delta)
    m = head.noise_multipliers()
    single = accounting.gaussian_equivalent_multiplier([m["xtx"], m["xty"]])
    analytic = dp_accounting.get_sigma_gaussian(epsilon, delta)
    # PLD is pessimistic by its discretisation only: never less noise, <1% more.
    assert analytic * 0.999 <= single <= analytic * 1.01


def test_rdp_is_looser_than_pld_but_valid():
    pld = DPLeastSquares(accountant="pld").calibrate(epsilon=1.0, delta=1e-5)
    rdp = DPLeastSquares(accountant="rdp").calibrate(epsilon=1.0, delta=1e-5)
    assert rdp.noise_multiplier > pld.noise_multiplier
    assert accounting.epsilon_of(rdp.dp_event(), 1e-5, "rdp") <= 1.0


def test_budget_split_changes_multipliers_not_guarantee():
    head = DPLeastSquares(xty_noise_ratio=0.5).calibrate(epsilon=2.0, delta=1e-5)
    m = head.noise_multipliers()
    assert m["xty"] == pytest.approx(0.5 * m["xtx"])
    spent = accounting.epsilon_of(head.dp_event(), 1e-5, "pld")
    assert 0.99 * 2.0 <= spent <= 2.0


def test_composition_identity_is_exact():
    # mu-GDP of Gaussian(s) is 1/s; mu's add in quadrature.
    assert accounting.gaussian_equivalent_multiplier([3.0, 4.0]) == pytest.approx(2.4)


@pytest.mark.parametrize(
    "epsilon,delta,n,match",
    [
        (0.0, 1e-5, None, "epsilon must be > 0"),
        (-1.0, 1e-5, None, "epsilon must be > 0"),
        (float("inf"), 1e-5, None, "finite"),
        (1.0, 0.0, None, "delta must be in"),
        (1.0, 1.0, None, "delta must be in"),
        (1.0, 1e-3, 5000, "must be < 1/N"),
    ],
)
def test_bad_budgets_are_rejected(epsilon, delta, n, match):
    with pytest.raises(ValueError, match=match):
        accounting.check_budget(epsilon, delta, n)


def test_uncalibrated_head_refuses_to_release():
    with pytest.raises(ValueError, match="not calibrated"):
        DPLeastSquares().dp_event()


def test_unknown_accountant():
    with pytest.raises(ValueError, match="accountant"):
        accounting.make_accountant("zcdp")


def test_privacy_statement_names_relation_and_budget():
    text = accounting.privacy_statement(
        method="dp_ls", epsilon=1.0, delta=1e-5, accountant="pld", covered="the weights"
    )
    assert "add-or-remove-one" in text and "(1, 1e-05)" in text and "PLD" in text
    assert "Not covered" in text
