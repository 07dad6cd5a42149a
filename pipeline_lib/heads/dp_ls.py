"""DP least squares (DP-LS): a ridge-regression head from two noisy releases.

Releases (add-or-remove-one neighbouring relation; every feature vector has
L2 norm <= C, enforced by `bound_rows` before the sums are taken):

* ``xtx`` = X^T X + E, E a d x d matrix of iid N(0, (s_xtx C^2)^2) entries.
  Sensitivity: one example changes X^T X by x x^T, whose Frobenius norm is
  ||x||^2 <= C^2. The released matrix is then symmetrised, (M + M^T) / 2,
  which is post-processing and halves the off-diagonal noise variance.
* ``xty`` = X^T Y + F with one-hot Y, F a d x K matrix of iid
  N(0, (s_xty C)^2) entries; column k is drawn with its own key (class k).
  Sensitivity: one example (x, y) changes X^T Y by x e_y^T, Frobenius norm
  ||x|| <= C.

Each release is a Gaussian mechanism with noise multiplier s = stddev /
sensitivity; the whole head is the composition of the two Gaussians
(`privacy.events.dp_ls_event(s_xtx, xty_noise_ratio)`), s_xty = xty_noise_ratio * s_xtx.
Kernel calls: `privacy.clipping.bound_rows` (in the statistics pass),
`privacy.noise.gaussian` / `gaussian_per_class` (the two releases). Everything after the
releases is post-processing: projecting the noisy Gram matrix onto the PSD
cone (clip negative eigenvalues) and solving (G + lambda I) W = xty, where
lambda = ridge_lambda + ridge_noise_factor * s_xtx C^2 sqrt(d) depends only
on public quantities.
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np

from pipeline_lib.heads.base import (
    ACCOUNTANT,
    FEATURE_BOUND,
    NOISE_MULTIPLIER,
    NONNEGATIVE,
    POSITIVE,
    PrivateHead,
    check_fields,
)
from pipeline_lib.heads.linear import solve_ridge_psd
from pipeline_lib.heads.stats import SuffStats
from pipeline_lib.privacy import accounting, events, noise


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoisyStats:
    """What DP-LS releases: the only data-dependent inputs of the solve."""

    xtx: np.ndarray  # (d, d) symmetric, noisy, float64
    xty: np.ndarray  # (d, K) noisy, float64


FIELD_RULES = {
    **FEATURE_BOUND,
    "ridge_lambda": NONNEGATIVE,
    "ridge_noise_factor": NONNEGATIVE,
    "xty_noise_ratio": POSITIVE,
    **ACCOUNTANT,
    **NOISE_MULTIPLIER,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPLeastSquares(PrivateHead):
    """Public hyperparameters of DP-LS; `noise_multiplier` is set by `calibrate`."""

    l2_clip_norm: float = 1.0
    feature_transform: str = "normalize"
    ridge_lambda: float = 1e-3
    ridge_noise_factor: float = 0.25
    xty_noise_ratio: float = 1.0
    accountant: str = "pld"
    noise_multiplier: float | None = None  # s_xtx; s_xty = xty_noise_ratio * s_xtx

    name = "dp_ls"

    def __post_init__(self):
        check_fields(self.name, self, FIELD_RULES)

    def noise_multipliers(self) -> dict[str, float]:
        s = self._require_calibrated()
        return {"xtx": s, "xty": self.xty_noise_ratio * s}

    def dp_event(self) -> dp_accounting.DpEvent:
        return self._event(self._require_calibrated())

    def _event(self, s: float) -> dp_accounting.DpEvent:
        return events.dp_ls_event(s, self.xty_noise_ratio)

    def _require_calibrated(self) -> float:
        if self.noise_multiplier is None:
            raise ValueError("dp_ls: not calibrated; call .calibrate(epsilon=, delta=) first")
        return self.noise_multiplier

    def calibrate(
        self, *, epsilon: float, delta: float, num_examples: int | None = None
    ) -> DPLeastSquares:
        """Smallest s spending at most (epsilon, delta); N only enters the budget check."""
        # Exact for two composed Gaussians: the equivalent single multiplier
        # is s / sqrt(1 + 1/r^2); start the bracket search right there.
        r = self.xty_noise_ratio
        guess = dp_accounting.get_sigma_gaussian(epsilon, delta) * math.sqrt(1 + 1 / r**2)
        cal = accounting.calibrate_noise_scale(
            self._event,
            target_epsilon=epsilon,
            target_delta=delta,
            accountant=self.accountant,
            initial_guess=guess,
            num_examples=num_examples,
        )
        return dataclasses.replace(self, noise_multiplier=cal.noise_scale)

    def ridge(self, feature_dim: int) -> float:
        s = self._require_calibrated()
        return self.ridge_lambda + self.ridge_noise_factor * s * self.l2_clip_norm**2 * math.sqrt(
            feature_dim
        )

    def release(self, stats: SuffStats, *, key: noise.NoiseKey) -> NoisyStats:
        """The two noisy releases. Each draw has its own key (release, class)."""
        self._check_stats(stats)
        c = self.l2_clip_norm
        m = self.noise_multipliers()
        d, k = stats.feature_dim, stats.num_classes
        e = np.asarray(noise.gaussian(key, "dp_ls/xtx", (d, d), m["xtx"] * c**2), np.float64)
        xtx = stats.xtx + (e + e.T) / 2.0
        f = noise.gaussian_per_class(key, "dp_ls/xty", k, d, m["xty"] * c)
        xty = stats.xty + np.asarray(f, np.float64).T
        return NoisyStats(xtx=xtx, xty=xty)

    def fit(self, stats: SuffStats, *, key: noise.NoiseKey) -> dict[str, np.ndarray]:
        """Release, then post-process into weights (d, K) and a zero bias."""
        noisy = self.release(stats, key=key)
        weights = solve_ridge_psd(noisy.xtx, noisy.xty, self.ridge(stats.feature_dim))
        return {
            "weights": weights.astype(np.float32),
            "bias": np.zeros(stats.num_classes, np.float32),
        }

    def _check_stats(self, stats: SuffStats) -> None:
        if stats.l2_clip_norm != self.l2_clip_norm or stats.transform != self.feature_transform:
            raise ValueError(
                f"dp_ls: statistics were computed with l2_clip_norm={stats.l2_clip_norm}, "
                f"transform={stats.transform!r}, but the head uses "
                f"{self.l2_clip_norm}, {self.feature_transform!r}"
            )
