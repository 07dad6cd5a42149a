"""DP-FC: DP gradient descent on the logistic loss, preconditioned by a private covariance.

The head is multinomial logistic regression with weights W (d, K) and bias
b = a b~, written as one matrix W~ = [W; b~] (d+1, K) acting on augmented
features x~ = [x; a], where a = ``bias_scale`` is a public constant. Every
feature vector has L2 norm <= C (`bound_rows`, exactly as at test time), so
||x~||^2 <= C^2 + a^2. Neighbouring relation: add or remove one example.

Releases
--------
* ``covariance`` (once): A = sum_i x~_i x~_i^T + E, E a (d+1) x (d+1) matrix
  of iid N(0, (s_cov (C^2 + a^2))^2) entries, drawn with the key
  (key, "dp_fc/covariance"). Sensitivity: one example changes the sum by
  x~ x~^T, whose Frobenius norm is ||x~||^2 <= C^2 + a^2. (Its d x d block is
  X^T X as in DP-LS; the extra row and column, sum_i x_i and a N, give the
  bias direction its own curvature without dividing by the private N.)
  The matrix is then symmetrised, (A + A^T) / 2 (post-processing; halves the
  off-diagonal noise variance), projected onto the PSD cone by clipping
  negative eigenvalues, and regularised: P = (A_psd + lambda I)^-1 with
  lambda = ridge_lambda + ridge_noise_factor * s_cov (C^2 + a^2) sqrt(d+1),
  public. P is kept as an eigendecomposition, computed once. The un-noised sum
  is a function of the data and (C, transform, a) only, so the runs of one
  store in one process share it (`GRAMS`, a `stats.StatsMemo` keyed by the
  store's fingerprint; never released); each run draws its own E.
* ``gradient`` (at each of T = ``num_steps`` steps): S_t + Z_t, where S_t is
  the sum over the batch of per-example softmax cross-entropy gradients with
  respect to W~, each clipped to norm G = ``l2_grad_clip`` (closed form, see
  `logistic_dp`), and Z_t has iid N(0, (s_grad G)^2) entries, the column of
  class k drawn with the key (key, "dp_fc/gradient", k, t). Sensitivity: G.
  The batch is the whole training set by default (one pass per step), or an
  exact Poisson sample with q = batch_size / N when ``batch_size`` is set.

Post-processing: W~ starts at zero and W~ <- W~ - (learning_rate / q) P (S_t
+ Z_t) (q = 1 for full batches). A sum of gradients preconditioned by the
inverse of a sum of outer products is invariant to the data set's size, so
no step divides by the private N; 1/q rescales a Poisson batch's expected sum
to the full sum (q is a public hyperparameter derived from N as in DP-SGD;
see `dp_sgd` for that convention).

Budget split: s_grad = s_cov * sqrt(T f / (1 - f)), f = ``covariance_share``.
For full batches this gives the covariance exactly the fraction f of the
Gaussian-DP mu^2 (mu^2 = 1/s_cov^2 + T/s_grad^2); with Poisson batches the
same ratio is kept and amplification by sampling shrinks the gradients' cost.

DpEvent: the covariance Gaussian composed with T self-composed gradient
Gaussians (Poisson-sampled at rate q when ``batch_size`` is set),
`privacy.events.dp_fc_event(s_cov, s_grad / s_cov, T, q)`. Kernel calls:
`privacy.clipping` (features, gradients), `privacy.noise.gaussian` (the
covariance), `privacy.noise.per_class_normal` (gradients), `privacy.sampling`
(Poisson batches).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.heads import logistic_dp as ldp
from pipeline_lib.heads.base import (
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    PrivateHead,
    check_calibrated_num_examples,
    check_fields,
    in_interval,
    optional,
)
from pipeline_lib.heads.stats import StatsMemo
from pipeline_lib.privacy import accounting, events, noise

NAME = "dp_fc"
GRAMS = StatsMemo()  # augmented X^T X per store and bounds, for this process (never released)
FIELD_RULES = {
    **ldp.COMMON_FIELD_RULES,
    "bias_scale": POSITIVE,
    "num_steps": POSITIVE_INT,
    "covariance_share": in_interval(0, 1, closed_low=False, closed_high=False),
    "ridge_lambda": NONNEGATIVE,
    "ridge_noise_factor": NONNEGATIVE,
    "batch_size": optional(POSITIVE_INT, "full batch"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPFeatureCovariance(PrivateHead):
    """Public hyperparameters of DP-FC; `calibrate` sets the last two fields."""

    l2_clip_norm: float = 1.0
    feature_transform: str = "normalize"
    bias_scale: float = 1.0  # the constant feature a whose weight is the bias / a
    l2_grad_clip: float = 1.0
    num_steps: int = 10  # full passes over the data (full batch) or Poisson batches
    learning_rate: float = 2.0
    covariance_share: float = 0.5  # fraction f of the full-batch GDP mu^2 for the covariance
    ridge_lambda: float = 1e-3
    ridge_noise_factor: float = 0.25  # lambda += factor * sigma_cov * sqrt(d + 1)
    batch_size: int | None = None  # None: full batch; else expected Poisson batch size
    accountant: str = "pld"
    max_in_memory_bytes: float = 2e9  # cache bounded features when N * d * 4 fits
    noise_multiplier: float | None = None  # s_cov, set by calibrate
    num_examples: int | None = None  # the N the accounting used (Poisson batches only)

    name = NAME
    CALIBRATION_FIELDS = ("noise_multiplier", "num_examples")

    def __post_init__(self):
        check_fields(NAME, self, FIELD_RULES)
        if self.ridge_lambda == 0 and self.ridge_noise_factor == 0:
            raise ValueError(f"{NAME}: ridge_lambda and ridge_noise_factor cannot both be 0")

    # ------------------------------------------------------------------ public parameters

    @property
    def covariance_sensitivity(self) -> float:
        return self.l2_clip_norm**2 + self.bias_scale**2

    @property
    def grad_noise_ratio(self) -> float:
        f = self.covariance_share
        return math.sqrt(self.num_steps * f / (1.0 - f))

    def sampling_prob(self, num_examples: int | None) -> float:
        if self.batch_size is None:
            return 1.0
        if not (isinstance(num_examples, int | np.integer) and num_examples > 0):
            raise ValueError(
                f"{NAME}: batch_size={self.batch_size} needs num_examples (a positive int) "
                f"to set q = batch_size / N; got {num_examples!r}"
            )
        if self.batch_size > num_examples:
            raise ValueError(
                f"{NAME}: batch_size={self.batch_size} exceeds the {num_examples} training "
                "examples; lower batch_size or set it to null for full batches"
            )
        return self.batch_size / int(num_examples)

    def noise_multipliers(self) -> dict[str, float]:
        s = self._require_calibrated()
        return {"covariance": s, "gradient": self.grad_noise_ratio * s}

    def dp_event(self) -> dp_accounting.DpEvent:
        return self._event(self._require_calibrated(), self.num_examples)

    def _event(self, s: float, num_examples: int | None) -> dp_accounting.DpEvent:
        q = None if self.batch_size is None else self.sampling_prob(num_examples)
        return events.dp_fc_event(s, self.grad_noise_ratio, self.num_steps, q)

    def _require_calibrated(self) -> float:
        if self.noise_multiplier is None:
            raise ValueError(
                f"{NAME}: not calibrated; call .calibrate(epsilon=, delta=, num_examples=) first"
            )
        return self.noise_multiplier

    def calibrate(
        self, *, epsilon: float, delta: float, num_examples: int | None = None
    ) -> DPFeatureCovariance:
        """Set s_cov (and so s_grad) to spend at most (epsilon, delta).

        `num_examples` (N) is required only with Poisson batches (q =
        batch_size / N); it is recorded so that `fit` can refuse other data.
        For full batches the event is a composition of Gaussians, equivalent
        to one Gaussian with multiplier s_cov sqrt(f), which seeds the search
        exactly; with Poisson batches the seed uses the Gaussian-DP central-limit
        approximation. The search and the spent epsilon use the configured
        accountant.
        """
        q = self.sampling_prob(num_examples)  # validates num_examples for Poisson batches
        n = None if num_examples is None else int(num_examples)
        target_mu = 1.0 / dp_accounting.get_sigma_gaussian(epsilon, delta)
        r = self.grad_noise_ratio

        def mu(s: float) -> float:
            return math.hypot(1.0 / s, ldp.gdp_mu(q, self.num_steps, r * s))

        guess = ldp.solve_scale(mu, target_mu)
        cal = accounting.calibrate_noise_scale(
            lambda s: self._event(s, n),
            target_epsilon=epsilon,
            target_delta=delta,
            accountant=self.accountant,
            initial_guess=guess,
            num_examples=n,
        )
        return dataclasses.replace(self, noise_multiplier=cal.noise_scale, num_examples=n)

    def ridge(self, feature_dim: int) -> float:
        s = self._require_calibrated()
        sigma = s * self.covariance_sensitivity
        return self.ridge_lambda + self.ridge_noise_factor * sigma * math.sqrt(feature_dim + 1)

    # ------------------------------------------------------------------ releases

    def augmented_gram(self, rows: ldp.BoundedRows) -> np.ndarray:
        """sum_i x~_i x~_i^T over the bounded rows (NOT private; never released).

        One pass over the data, or none: the sum depends only on the data, C, the
        transform and a, so runs of the same store (epsilons, seeds, tuning candidates)
        in one warm process share it through `GRAMS` (keyed by the store's fingerprint).
        Every run still draws its own covariance noise.
        """
        params = (NAME, rows.l2_clip_norm, rows.transform, float(self.bias_scale))
        return GRAMS.get(rows.data, params, lambda: self._augmented_gram_pass(rows))

    def _augmented_gram_pass(self, rows: ldp.BoundedRows) -> np.ndarray:
        d = rows.feature_dim
        gram = np.zeros((d + 1, d + 1), np.float64)
        for xb, _, mb in rows.iter_blocks():
            gram += np.asarray(_augmented_gram(xb, mb, float(self.bias_scale)), np.float64)
        return gram

    def release_covariance(self, gram: np.ndarray, *, key: noise.NoiseKey) -> np.ndarray:
        """The covariance release: gram + E, symmetrised (see the module docstring)."""
        std = self._require_calibrated() * self.covariance_sensitivity
        e = np.asarray(noise.gaussian(key, f"{NAME}/covariance", gram.shape, std), np.float64)
        return gram + (e + e.T) / 2.0

    def preconditioner(self, noisy_gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(V, 1 / (max(e, 0) + lambda)) with noisy_gram = V diag(e) V^T; P = V diag(.) V^T."""
        evals, evecs = np.linalg.eigh((noisy_gram + noisy_gram.T) / 2.0)
        inv = 1.0 / (np.clip(evals, 0.0, None) + self.ridge(noisy_gram.shape[0] - 1))
        return evecs, inv

    # ------------------------------------------------------------------ training

    def fit(
        self, data, *, key: noise.NoiseKey, on_step: Callable | None = None
    ) -> dict[str, np.ndarray]:
        """Train on `data` (FeatureStore or InMemoryFeatures); returns weights (d, K), bias (K,).

        `on_step(step, clean, noisy)`, if given, sees each step's clipped
        gradient sum and the released noisy sum (dicts with "weights" (d, K)
        and "bias" (K,), the latter with respect to b~ = b / a).
        """
        s = self._require_calibrated()
        if self.batch_size is not None:
            check_calibrated_num_examples(NAME, self.num_examples, data.num_examples)
        rows = ldp.BoundedRows(
            data,
            l2_clip_norm=self.l2_clip_norm,
            transform=self.feature_transform,
            max_in_memory_bytes=self.max_in_memory_bytes,
        )
        d, k = rows.feature_dim, rows.num_classes
        evecs, inv = self.preconditioner(
            self.release_covariance(self.augmented_gram(rows), key=key)
        )
        evecs, inv = jnp.asarray(evecs, jnp.float32), jnp.asarray(inv, jnp.float32)
        q = self.sampling_prob(self.num_examples)
        params = {"weights": jnp.zeros((d, k), jnp.float32), "bias": jnp.zeros(k, jnp.float32)}
        noise_keys = noise.KeyStream(key, f"{NAME}/gradient")
        sampler = noise.KeyStream(key, f"{NAME}/poisson")
        sub_rows = ldp.sub_batch_rows(self.batch_size) if self.batch_size else 0
        update = partial(
            _preconditioned_update,
            noise_std=jnp.float32(self.grad_noise_ratio * s * self.l2_grad_clip),
            step_size=jnp.float32(self.learning_rate / q),
        )
        grad_kw = dict(l2_grad_clip=self.l2_grad_clip, bias_scale=self.bias_scale)
        for t in range(self.num_steps):
            if self.batch_size is None:
                gw, gb = ldp.full_grad_sum(params, rows, **grad_kw)
            else:
                gw, gb = rows.sampled_grad_sum(params, sampler, t, q, sub_rows=sub_rows, **grad_kw)
            params, noisy = update(params, gw, gb, evecs, inv, noise_keys.base, t)
            if on_step is not None:
                on_step(t, {"weights": gw, "bias": gb}, noisy)
        return {
            "weights": np.asarray(params["weights"], np.float32),
            "bias": np.asarray(self.bias_scale * params["bias"], np.float32),
        }


@jax.jit
def _augmented_gram(xb, mask, bias_scale):
    xa = jnp.concatenate([xb * mask[:, None], (bias_scale * mask)[:, None]], axis=1)
    return xa.T @ xa


@jax.jit
def _preconditioned_update(params, gw, gb, evecs, inv, noise_base, step, *, noise_std, step_size):
    """W~ <- W~ - step_size * P (S_t + Z_t), with per-class noise keys (class, step)."""
    d, k = gw.shape
    z = noise_std * noise.per_class_normal(noise_base, step, num_classes=k, dim=d + 1)
    noisy = {"weights": gw + z[:, :d].T, "bias": gb + z[:, d]}
    g = jnp.concatenate([noisy["weights"], noisy["bias"][None, :]], axis=0)
    direction = evecs @ (inv[:, None] * (evecs.T @ g))
    new = {
        "weights": params["weights"] - step_size * direction[:d],
        "bias": params["bias"] - step_size * direction[d],
    }
    return new, noisy
