"""Private hyperparameter selection: mechanisms and their accounting.

Private selection (``selection: private``) over G candidate configurations of
one head, for a target (epsilon, delta) that covers the whole procedure:

1. The training split is cut into a *fit* part and a *validation* part by a
   per-example hash (``pipeline_lib.features.split``): adding or removing one
   example changes one part by one example and moves nobody else.
2. Every candidate is trained with DP on the fit part. Candidate g's noise is
   ``t * s_g``, where ``s_g`` is the noise that would give candidate g the whole
   (epsilon, delta) on its own; one common factor ``t`` is calibrated below.
3. The G validation scores (numbers of correct predictions) are released with
   Gaussian noise: one example of the validation part changes each count by at
   most 1, so the vector's L2 sensitivity is sqrt(G), and the noise std is
   ``t * z * sqrt(G)`` with ``z`` the single-Gaussian multiplier for (epsilon, delta).
   The candidate with the highest noisy score is selected (post-processing).
4. The whole release is ``ComposedDpEvent([candidate events..., Gaussian(t z)])``:
   all G trainings and the selection compose, which is conservative (a private
   example sits in only one of the two parts). ``t`` is the smallest factor whose
   composed event spends at most the target, by the same dp_accounting calibration
   as every single run.

The reported epsilon of a tuned run is that total; each candidate's own
epsilon (what it would cost alone) is reported next to it.

Public selection (``selection: public``) trains the candidates with DP at the
same (epsilon, delta) on a dataset the config declares public, compares them
on its test split, and then trains only the winner on the private data: the
private data pays for one run, so the run's epsilon covers tuning.
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np

from pipeline_lib.privacy import accounting, events, noise

__all__ = [
    "JointCalibration",
    "RepeatAndSelect",
    "calibrate_jointly",
    "calibrate_repeat_and_select",
    "noisy_selection",
    "with_noise",
]


def with_noise(head, noise_multiplier: float):
    """A calibrated head with its noise scale replaced (everything else kept). A head
    with private centring keeps its mean release and scales only the head's noise."""
    if hasattr(head, "with_head_noise"):
        return head.with_head_noise(noise_multiplier)
    return dataclasses.replace(head, noise_multiplier=float(noise_multiplier))


@dataclasses.dataclass(frozen=True)
class JointCalibration:
    heads: list  # calibrated candidates, noise t * s_g
    selection_noise_multiplier: float  # t * z, per unit of L2 sensitivity sqrt(G)
    factor: float  # t
    event: dp_accounting.DpEvent
    spent_epsilon: float  # of the whole composed event, at delta
    candidate_epsilons: list[float]  # each candidate alone, at delta


def _joint_event(alone: list, z: float, t: float) -> dp_accounting.DpEvent:
    trained = [with_noise(h, t * h.noise_multiplier).dp_event() for h in alone]
    return events.private_selection_event(trained, t * z)


def calibrate_jointly(
    heads: list, *, epsilon: float, delta: float, accountant: str, num_examples: int
) -> JointCalibration:
    """Calibrate G candidates and the selection so that all of it spends <= (epsilon, delta)."""
    if not heads:
        raise ValueError("no candidates to calibrate")
    alone = [h.calibrate(epsilon=epsilon, delta=delta, num_examples=num_examples) for h in heads]
    z = dp_accounting.get_sigma_gaussian(epsilon, delta)
    g = len(alone) + 1
    cal = accounting.calibrate_noise_scale(
        lambda t: _joint_event(alone, z, t),
        target_epsilon=epsilon,
        target_delta=delta,
        accountant=accountant,
        initial_guess=math.sqrt(g),  # exact for Gaussian-only heads (mu adds in quadrature)
        num_examples=num_examples,
    )
    t = cal.noise_scale
    final = [with_noise(h, t * h.noise_multiplier) for h in alone]
    event = _joint_event(alone, z, t)
    return JointCalibration(
        heads=final,
        selection_noise_multiplier=t * z,
        factor=t,
        event=event,
        spent_epsilon=accounting.spend(
            event, target_epsilon=epsilon, delta=delta, accountant=accountant
        ),
        candidate_epsilons=[accounting.epsilon_of(h.dp_event(), delta, accountant) for h in final],
    )


def noisy_selection(
    correct: list[int], *, noise_multiplier: float, key: noise.NoiseKey
) -> tuple[int, np.ndarray]:
    """(argmax index, noisy counts): Gaussian noise of std noise_multiplier * sqrt(G).

    Only the noisy counts and the argmax are released; the exact counts never leave.
    """
    counts = np.asarray(correct, np.float64)
    std = noise_multiplier * math.sqrt(len(counts))
    draw = noise.gaussian(key, "tuning/validation_scores", (len(counts),), std)
    noisy = counts + np.asarray(draw, np.float64)
    return int(np.argmax(noisy)), noisy


# ------------------------------------------------------------------------ repeat and select
#
# Papernot & Steinke, "Hyperparameter Tuning with Renyi Differential Privacy" (ICLR 2022,
# arXiv 2110.03620). The base mechanism Q draws one candidate uniformly at random from the
# grid (data-independent randomness), trains it with DP on the fit part and releases its
# validation count (correct predictions, L2 sensitivity 1) with Gaussian noise. Repeat-and-
# select runs Q a random number K of times, K ~ D (Poisson, or a truncated negative
# binomial: logarithmic, geometric, ...), and releases ONLY the output of the run with the
# best noisy score: its weights, its hyperparameters and its noisy score. K, the losers and
# their scores are never released (publishing K would void the analysis). The RDP of the
# whole procedure is the paper's Theorem 2 / 6 bound on Q's RDP, which dp_accounting's
# RepeatAndSelectDpEvent implements (RDP accountant only). Its cost is Q's plus a term in
# log(E[K]): it does not grow with the number of candidates G.
#
# Q's event must cover every candidate. Q runs candidate g with probability 1/G, a mixture
# whose Renyi divergence is at most the largest of the candidates' (exp((a-1) D_a) is
# jointly convex). So the base event is one event that dominates every candidate's:
#   * all candidates have the same event (a grid over post-processing hyperparameters such
#     as learning rates or ridge factors): that event;
#   * all candidates are compositions of Gaussians: a Gaussian with the smallest equivalent
#     noise multiplier (Gaussian mu adds in quadrature), which dominates each of them;
#   * otherwise the grid is refused with the hyperparameters that change the event.

TRIALS_LAWS = {"poisson": math.inf, "logarithmic": 0.0, "geometric": 1.0}
SCORE_NOISE_FACTOR = 4.0  # the score's multiplier is 4 t z: it gets 1/17 of the Gaussian mu^2


def trials_shape(law: str, shape: float | None = None) -> float:
    """dp_accounting's `shape` of a law: inf (Poisson), 0, 1, or eta of a truncated NB."""
    if law == "truncated_negative_binomial":
        if shape is None or not 0 < shape < math.inf:
            raise ValueError(f"truncated_negative_binomial needs a shape in (0, inf), got {shape}")
        return float(shape)
    if law not in TRIALS_LAWS:
        known = [*TRIALS_LAWS, "truncated_negative_binomial"]
        raise ValueError(f"trials law {law!r} unknown; use one of {known}")
    return TRIALS_LAWS[law]


def _tnb_mean(eta: float, gamma: float) -> float:
    if eta == 0:  # logarithmic
        return (1 - gamma) / (gamma * math.log(1 / gamma))
    return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def tnb_gamma(shape: float, mean: float) -> float:
    """The gamma of the truncated negative binomial with this shape and mean (bisection)."""
    if not mean > 1:
        raise ValueError(f"the mean number of trials must be > 1, got {mean}")
    lo, hi = 1e-12, 1 - 1e-12  # the mean decreases from +inf to 1 as gamma goes 0 -> 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _tnb_mean(shape, mid) > mean:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def trials_pmf(k: np.ndarray, *, mean: float, shape: float) -> np.ndarray:
    """P[K = k] of the declared law (for tests and the report)."""
    from scipy import stats

    k = np.asarray(k)
    if shape == math.inf:
        return stats.poisson.pmf(k, mean)
    gamma = tnb_gamma(shape, mean)
    if shape == 0:
        return np.where(k >= 1, stats.logser.pmf(k, 1 - gamma), 0.0)
    base = stats.nbinom.pmf(k, shape, gamma)
    return np.where(k >= 1, base / (1 - stats.nbinom.pmf(0, shape, gamma)), 0.0)


def draw_trials(key: noise.NoiseKey, *, mean: float, shape: float) -> int:
    """K, the number of trials, drawn from the law with the job's secret key."""
    rng = key.numpy_generator("tuning/num_trials")
    if shape == math.inf:
        return int(rng.poisson(mean))
    gamma = tnb_gamma(shape, mean)
    if shape == 0:
        return int(rng.logseries(1 - gamma))
    while True:  # a negative binomial conditioned on K >= 1
        k = int(rng.negative_binomial(shape, gamma))
        if k >= 1:
            return k


def draw_candidates(key: noise.NoiseKey, num_trials: int, num_candidates: int) -> np.ndarray:
    """Which candidate each trial runs: uniform over the grid, independent of the data."""
    rng = key.numpy_generator("tuning/candidates")
    return rng.integers(0, num_candidates, size=num_trials)


def _gaussian_mu2(event) -> float | None:
    """sum of 1/s^2 of a composition of Gaussians; None for anything else."""
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return event.noise_multiplier**-2.0
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        inner = _gaussian_mu2(event.event)
        return None if inner is None else event.count * inner
    if isinstance(event, dp_accounting.ComposedDpEvent):
        parts = [_gaussian_mu2(e) for e in event.events]
        return None if any(p is None for p in parts) else sum(parts)
    return None


def dominating_event(candidate_events: list) -> dp_accounting.DpEvent:
    """One event whose RDP is >= every candidate's at every order (see the notes above)."""
    if all(e == candidate_events[0] for e in candidate_events):
        return candidate_events[0]
    mu2 = [_gaussian_mu2(e) for e in candidate_events]
    if all(m is not None for m in mu2):
        return events.gaussian_event(max(mu2) ** -0.5)
    raise ValueError(
        "repeat_and_select needs candidates whose privacy events are equal (a grid over "
        "post-processing hyperparameters such as learning_rate or ridge factors) or all "
        "compositions of Gaussians; this grid changes a Poisson-sampled event. Use "
        "selection: private (composition) for it"
    )


@dataclasses.dataclass(frozen=True)
class RepeatAndSelect:
    heads: list  # every candidate, calibrated at factor t
    score_noise_multiplier: float  # noise std of one trial's validation count (sensitivity 1)
    factor: float  # t
    mean_trials: float
    shape: float
    base_event: dp_accounting.DpEvent  # one trial (Q)
    event: dp_accounting.DpEvent  # the whole procedure
    spent_epsilon: float  # RDP accountant, at delta
    trial_epsilon: float  # one trial alone, RDP accountant, at delta


def _rs_events(alone: list, z: float, t: float, mean: float, shape: float):
    trained = dominating_event([with_noise(h, t * h.noise_multiplier).dp_event() for h in alone])
    base = events.private_selection_event([trained], SCORE_NOISE_FACTOR * t * z)
    return base, events.repeat_and_select_event(base, mean, shape)


def calibrate_repeat_and_select(
    heads: list, *, epsilon: float, delta: float, num_examples: int, mean: float, shape: float
) -> RepeatAndSelect:
    """Calibrate so that repeat-and-select over `heads` spends <= (epsilon, delta) (RDP)."""
    if not heads:
        raise ValueError("no candidates to calibrate")
    alone = [h.calibrate(epsilon=epsilon, delta=delta, num_examples=num_examples) for h in heads]
    z = dp_accounting.get_sigma_gaussian(epsilon, delta)
    cal = accounting.calibrate_noise_scale(
        lambda t: _rs_events(alone, z, t, mean, shape)[1],
        target_epsilon=epsilon,
        target_delta=delta,
        accountant="rdp",  # the only accountant that supports RepeatAndSelectDpEvent
        initial_guess=2.0,
        num_examples=num_examples,
    )
    t = cal.noise_scale
    base, event = _rs_events(alone, z, t, mean, shape)
    return RepeatAndSelect(
        heads=[with_noise(h, t * h.noise_multiplier) for h in alone],
        score_noise_multiplier=SCORE_NOISE_FACTOR * t * z,
        factor=t,
        mean_trials=float(mean),
        shape=float(shape),
        base_event=base,
        event=event,
        spent_epsilon=accounting.spend(
            event, target_epsilon=epsilon, delta=delta, accountant="rdp"
        ),
        trial_epsilon=accounting.epsilon_of(base, delta, "rdp"),
    )


def noisy_score(correct: int, *, noise_multiplier: float, key: noise.NoiseKey) -> float:
    """One trial's validation count plus N(0, noise_multiplier^2) (sensitivity 1)."""
    draw = noise.gaussian(key, "tuning/trial_score", (), noise_multiplier)
    return float(correct) + float(draw)
