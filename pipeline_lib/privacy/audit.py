"""Empirical privacy audit: a statistical lower bound on a mechanism's epsilon.

An (epsilon, delta)-DP mechanism M limits every test that tries to tell
M(D) from M(D') for neighbouring D, D'. Take D' = D plus one "canary"
example. For any rejection region S ("the canary was in"), with

    FPR = P[M(D) in S]        (says "in" when it was not)
    FNR = P[M(D') not in S]   (says "out" when it was in)

DP applied to S and to its complement gives

    1 - FNR <= e^eps FPR + delta   and   1 - FPR <= e^eps FNR + delta,

so eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)).
(Add-or-remove neighbours are symmetric, so both inequalities hold.)

The audit runs the mechanism many times on D and on D', reduces each output
to a scalar score (a good attacker's statistic: for Gaussian noise the
log-likelihood ratio, which is linear in projections of the output), and
uses threshold tests ``direction * score > direction * threshold``.

Honesty of the bound (what `AuditResult.epsilon_lower_bound` guarantees):

* FPR and FNR are replaced by one-sided Clopper-Pearson upper bounds, each at
  level 1 - (1 - confidence) / 2. By a union bound both hold at once with
  probability >= confidence, and then the epsilon above is a lower bound on
  the mechanism's true epsilon (the formula is decreasing in FPR and FNR).
* Picking the best of many thresholds on the same samples would inflate the
  bound (a maximum of many noisy estimates). Instead the threshold and
  direction are chosen on a *selection* part of the samples (the first half
  of each array by default) and the bound is computed on the held-out
  *evaluation* part only, so only one test is ever evaluated there.
  Bonferroni over all thresholds would be valid too but needlessly loose.
* The guarantee needs the scores of each array to be i.i.d., e.g. one fresh
  seed per run; `audit` uses a distinct seed for every run.

A lower bound below the claimed epsilon is not a proof of privacy (a
stronger attack might do better); a bound above it, at high confidence,
is proof of a bug. `AuditResult.max_detectable_epsilon` says how large a
bound the sample size could have produced at all: an audit is only able to
flag a claimed epsilon below that value.

Clopper-Pearson quantiles come from `scipy.stats.beta` (scipy is a
dependency of jax, so it is always installed alongside this package).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from scipy import stats as _stats


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditResult:
    """The outcome of one audit; all rates refer to the evaluation samples."""

    epsilon_lower_bound: float  # holds with probability >= confidence; >= 0
    delta: float
    confidence: float
    threshold: float  # the test says "canary in" iff direction * score > direction * threshold
    direction: int  # +1 or -1
    fpr: float  # point estimates on the evaluation samples
    fnr: float
    fpr_upper: float  # one-sided Clopper-Pearson upper bounds
    fnr_upper: float
    num_without: int  # evaluation sample sizes
    num_with: int
    selection_epsilon: float  # the same bound on the selection samples (optimistic; diagnostic)
    max_detectable_epsilon: float  # the largest bound these sample sizes can give at all


def clopper_pearson_upper(successes, trials: int, alpha: float):
    """One-sided upper confidence bound on a binomial rate, coverage >= 1 - alpha.

    The exact (Clopper-Pearson) bound: the Beta(k + 1, n - k) quantile at
    1 - alpha, and 1 when k = n. Vectorised over `successes`.
    """
    if trials <= 0:
        raise ValueError(f"trials must be > 0, got {trials}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = np.asarray(successes, np.float64)
    if np.any(k < 0) or np.any(k > trials):
        raise ValueError(f"successes must lie in [0, {trials}]")
    full = k >= trials
    upper = _stats.beta.ppf(1.0 - alpha, k + 1.0, np.where(full, 1.0, trials - k))
    return np.where(full, 1.0, upper)


def epsilon_from_rates(fpr, fnr, delta: float):
    """max(log((1-delta-FNR)/FPR), log((1-delta-FPR)/FNR)), clipped at 0 (vectorised)."""
    fpr = np.asarray(fpr, np.float64)
    fnr = np.asarray(fnr, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1.0 - delta - fnr, 0.0) / fpr)
        b = np.log(np.maximum(1.0 - delta - fpr, 0.0) / fnr)
    eps = np.fmax(a, b)  # fmax ignores a NaN in one of the two
    return np.where(np.isnan(eps), 0.0, np.maximum(eps, 0.0))


def _threshold_bounds(without, with_, *, alpha, delta, thresholds):
    """Bounds for tests "z > t" (z = direction * score) at every t in `thresholds`."""
    s0, s1 = np.sort(without), np.sort(with_)
    false_pos = len(s0) - np.searchsorted(s0, thresholds, side="right")  # without, z > t
    false_neg = np.searchsorted(s1, thresholds, side="right")  # with, z <= t
    fpr_hi = clopper_pearson_upper(false_pos, len(s0), alpha)
    fnr_hi = clopper_pearson_upper(false_neg, len(s1), alpha)
    return false_pos, false_neg, fpr_hi, fnr_hi, epsilon_from_rates(fpr_hi, fnr_hi, delta)


def _check_scores(name: str, scores) -> np.ndarray:
    arr = np.asarray(scores, np.float64)
    if arr.ndim != 1 or arr.size < 4:
        raise ValueError(f"{name}: need a 1-D array of at least 4 scores, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: scores contain NaN or Inf")
    return arr


def epsilon_lower_bound(
    scores_without,
    scores_with,
    *,
    delta: float,
    confidence: float = 0.95,
    selection_fraction: float = 0.5,
) -> AuditResult:
    """Lower-bound epsilon from scores of runs without and with the canary.

    The first `selection_fraction` of each array chooses the threshold and
    direction (best Clopper-Pearson bound over all thresholds and both
    directions); the rest gives the reported bound. See the module docstring.
    """
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 < selection_fraction < 1:
        raise ValueError(f"selection_fraction must be in (0, 1), got {selection_fraction}")
    without = _check_scores("scores_without", scores_without)
    with_ = _check_scores("scores_with", scores_with)
    alpha = (1.0 - confidence) / 2.0  # per rate; union bound over the two rates
    n0 = min(max(int(len(without) * selection_fraction), 2), len(without) - 2)
    n1 = min(max(int(len(with_) * selection_fraction), 2), len(with_) - 2)
    sel0, eval0 = without[:n0], without[n0:]
    sel1, eval1 = with_[:n1], with_[n1:]

    best = (-1.0, 1, -math.inf)  # (selection epsilon, direction, threshold in z units)
    for direction in (1, -1):
        z0, z1 = direction * sel0, direction * sel1
        # every distinct test "z > t" is realised by t = -inf or t = a sample value
        cand = np.concatenate([[-np.inf], np.unique(np.concatenate([z0, z1]))])
        eps = _threshold_bounds(z0, z1, alpha=alpha, delta=delta, thresholds=cand)[4]
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), direction, float(cand[i]))
    sel_eps, direction, t = best

    fp, fn, fpr_hi, fnr_hi, eps = _threshold_bounds(
        direction * eval0, direction * eval1, alpha=alpha, delta=delta, thresholds=np.array([t])
    )
    # no false positives and no false negatives: the largest bound possible
    ceiling = epsilon_from_rates(
        clopper_pearson_upper(0, len(eval0), alpha),
        clopper_pearson_upper(0, len(eval1), alpha),
        delta,
    )
    return AuditResult(
        epsilon_lower_bound=float(eps[0]),
        delta=float(delta),
        confidence=float(confidence),
        threshold=float(direction * t),
        direction=direction,
        fpr=float(fp[0]) / len(eval0),
        fnr=float(fn[0]) / len(eval1),
        fpr_upper=float(fpr_hi[0]),
        fnr_upper=float(fnr_hi[0]),
        num_without=len(eval0),
        num_with=len(eval1),
        selection_epsilon=sel_eps,
        max_detectable_epsilon=float(ceiling),
    )


def audit(
    run_mechanism: Callable[[bool, int], float],
    *,
    trials: int,
    delta: float,
    seed0: int = 0,
    confidence: float = 0.95,
) -> AuditResult:
    """Run the mechanism `trials` times without and `trials` times with the canary.

    `run_mechanism(include_canary, seed)` runs the real mechanism once on D
    (False) or on D plus the canary (True) with the given noise seed, and
    returns a scalar score of the released output. Every run gets a distinct
    seed (seed0 + i without the canary, seed0 + trials + i with it), so the
    scores are independent draws.
    """
    if trials < 8:
        raise ValueError(f"trials must be >= 8, got {trials}")
    without = np.array([float(run_mechanism(False, seed0 + i)) for i in range(trials)])
    with_ = np.array([float(run_mechanism(True, seed0 + trials + i)) for i in range(trials)])
    return epsilon_lower_bound(without, with_, delta=delta, confidence=confidence)


def regeneration_audit(
    release: Callable[[bool, int], tuple[np.ndarray, dict]],
    regenerate: Callable[[bool, dict], np.ndarray],
    *,
    trials: int,
    delta: float,
    confidence: float = 0.95,
) -> AuditResult:
    """Membership audit by an attacker who rebuilds the noise from published metadata.

    The threat this tests: the attacker holds every published file and the code,
    and knows D and the canary. ``release(include_canary, i)`` runs the real
    mechanism once (trial i) on D or D plus the canary and returns what is
    published: the released array and its metadata (metrics.json). The attacker
    then calls ``regenerate(include_canary, metadata)``: the output the
    mechanism would have given on D (or D + canary) with the noise that the
    metadata lets one recompute. If the noise really is a function of public
    metadata, one of the two regenerations equals the release exactly and the
    score

        ||out - regenerate(False)|| - ||out - regenerate(True)||

    separates the two hypotheses perfectly (the bound reaches
    `max_detectable_epsilon`); with a secret key it carries no information
    beyond what the DP guarantee allows.
    """

    def score(include_canary: bool, i: int) -> float:
        out, meta = release(include_canary, i)
        out = np.asarray(out, np.float64)
        away = np.linalg.norm(out - np.asarray(regenerate(False, meta), np.float64))
        near = np.linalg.norm(out - np.asarray(regenerate(True, meta), np.float64))
        return float(away - near)

    return audit(score, trials=trials, delta=delta, confidence=confidence)
