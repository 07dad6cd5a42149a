"""DP-SGD for a multinomial logistic-regression head (weights and bias).

Mechanism (add-or-remove-one neighbouring relation; every feature vector has
L2 norm <= C, enforced by `bound_rows` exactly as at test time):

* T = ceil(epochs * N / batch_size) steps. At step t every example joins the
  batch independently with probability q = batch_size / N (exact Poisson
  sampling, one Bernoulli draw per example per step from the key
  (key, "dp_sgd/poisson", chunk, t); see `logistic_dp`). Batches are ragged
  and may be empty.
* Release at step t: S_t + Z_t, where S_t is the sum over the batch of the
  per-example gradients of the softmax cross-entropy with respect to (W, b),
  each clipped to L2 norm G = ``l2_grad_clip`` (W and b together, closed
  form, see `logistic_dp`), and Z_t has iid N(0, (s G)^2) entries; the noise
  for class k (column k of W and entry k of b) is drawn with its own key
  (key, "dp_sgd/gradient", k, t). Sensitivity: adding or removing one
  example changes S_t by that example's clipped gradient, norm <= G.
  An empty batch releases Z_t alone and still takes a step.
* Everything else is post-processing: the noisy sum is divided by the PUBLIC
  expected batch size ``batch_size`` (never by the realised batch size, which
  is private), and fed to an optax optimizer (SGD with momentum or Adam) from
  zero-initialised weights and bias.

DpEvent: T self-composed Poisson-sampled Gaussians,
`privacy.events.dp_sgd_event(s, q, T)`. Kernel calls: `privacy.sampling`
(Poisson masks), `privacy.clipping.clip_factors` (gradients, via
`logistic_dp`), `privacy.noise.per_class_normal` (gradient noise).

On N: q = batch_size / N and T depend on the training-set size N, which is
not strictly public under add-or-remove-one (a neighbour has N +- 1). Taking
q and T from N and accounting for them as fixed is the standard practice of
DP-SGD libraries (Opacus, jax_privacy); we follow it and say so. N enters
only the sampling rate and the step count, never a normaliser. So `calibrate`
takes ``num_examples`` and records it; `fit` refuses data of another size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from functools import partial

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pipeline_lib.heads import logistic_dp as ldp
from pipeline_lib.heads.base import (
    POSITIVE,
    POSITIVE_INT,
    PrivateHead,
    check_calibrated_num_examples,
    check_fields,
    in_interval,
    one_of,
)
from pipeline_lib.privacy import accounting, events, noise

NAME = "dp_sgd"
FIELD_RULES = {
    **ldp.COMMON_FIELD_RULES,
    "batch_size": POSITIVE_INT,
    "epochs": POSITIVE,
    "optimizer": one_of(ldp.OPTIMIZERS),
    "lr_schedule": one_of(ldp.LR_SCHEDULES),
    "momentum": in_interval(0, 1, closed_low=True, closed_high=False),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGDLogistic(PrivateHead):
    """Public hyperparameters of DP-SGD; `calibrate` sets the last two fields."""

    l2_clip_norm: float = 1.0
    feature_transform: str = "normalize"
    l2_grad_clip: float = 1.0
    batch_size: int = 2048  # expected (public) batch size; q = batch_size / N
    epochs: float = 20.0  # T = ceil(epochs * N / batch_size) steps
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    learning_rate: float = 4.0
    lr_schedule: str = "constant"  # "constant" or "cosine" (decay to 0 over the T steps)
    momentum: float = 0.9  # sgd only
    accountant: str = "pld"
    max_in_memory_bytes: float = 2e9  # cache bounded features when N * d * 4 fits
    noise_multiplier: float | None = None  # set by calibrate
    num_examples: int | None = None  # the N the accounting used; set by calibrate

    name = NAME
    CALIBRATION_FIELDS = ("noise_multiplier", "num_examples")

    def __post_init__(self):
        check_fields(NAME, self, FIELD_RULES)
        if self.num_examples is not None:
            self._check_num_examples(self.num_examples)

    # ------------------------------------------------------------------ public parameters

    def _check_num_examples(self, n) -> int:
        if not (isinstance(n, int | np.integer) and n > 0):
            raise ValueError(f"{NAME}: num_examples must be a positive int, got {n!r}")
        if self.batch_size > n:
            raise ValueError(
                f"{NAME}: batch_size={self.batch_size} exceeds the {n} training examples; "
                "lower batch_size"
            )
        return int(n)

    def sampling_prob(self, num_examples: int) -> float:
        return self.batch_size / self._check_num_examples(num_examples)

    def num_steps(self, num_examples: int) -> int:
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))

    def noise_multipliers(self) -> dict[str, float]:
        return {"gradient": self._require_calibrated()[0]}

    def dp_event(self) -> dp_accounting.DpEvent:
        s, n = self._require_calibrated()
        return self._event(s, n)

    def _event(self, s: float, n: int) -> dp_accounting.DpEvent:
        return events.dp_sgd_event(s, self.sampling_prob(n), self.num_steps(n))

    def _require_calibrated(self) -> tuple[float, int]:
        if self.noise_multiplier is None or self.num_examples is None:
            raise ValueError(
                f"{NAME}: not calibrated; call .calibrate(epsilon=, delta=, num_examples=) first"
            )
        return self.noise_multiplier, self.num_examples

    def calibrate(
        self, *, epsilon: float, delta: float, num_examples: int | None = None
    ) -> DPSGDLogistic:
        """Smallest noise multiplier with spent epsilon <= target for N = num_examples.

        The search starts from the Gaussian-DP central-limit approximation
        (no accountant call); the search itself and the spent epsilon use the
        configured accountant.
        """
        n = self._check_num_examples(num_examples)
        q, steps = self.sampling_prob(n), self.num_steps(n)
        target_mu = 1.0 / dp_accounting.get_sigma_gaussian(epsilon, delta)
        guess = ldp.solve_scale(lambda s: ldp.gdp_mu(q, steps, s), target_mu)
        cal = accounting.calibrate_noise_scale(
            lambda s: self._event(s, n),
            target_epsilon=epsilon,
            target_delta=delta,
            accountant=self.accountant,
            initial_guess=guess,
            num_examples=n,
        )
        return dataclasses.replace(self, noise_multiplier=cal.noise_scale, num_examples=n)

    # ------------------------------------------------------------------ training

    def make_optimizer(self, num_steps: int) -> optax.GradientTransformation:
        lr = self.learning_rate
        if self.lr_schedule == "cosine":
            lr = optax.cosine_decay_schedule(self.learning_rate, num_steps)
        if self.optimizer == "adam":
            return optax.adam(lr)
        return optax.sgd(lr, momentum=self.momentum or None)

    def fit(
        self, data, *, key: noise.NoiseKey, on_step: Callable | None = None
    ) -> dict[str, np.ndarray]:
        """Train on `data` (FeatureStore or InMemoryFeatures); returns weights (d, K), bias (K,).

        `on_step(step, clean, noisy)`, if given, sees each step's clipped
        gradient sum and the released noisy sum (dicts with "weights", "bias");
        tests use it to check the noise actually added.
        """
        s, n = self._require_calibrated()
        check_calibrated_num_examples(NAME, n, data.num_examples)
        rows = ldp.BoundedRows(
            data,
            l2_clip_norm=self.l2_clip_norm,
            transform=self.feature_transform,
            max_in_memory_bytes=self.max_in_memory_bytes,
        )
        d, k = rows.feature_dim, rows.num_classes
        q, steps = self.sampling_prob(n), self.num_steps(n)
        sub_rows = ldp.sub_batch_rows(self.batch_size)
        params = {"weights": jnp.zeros((d, k), jnp.float32), "bias": jnp.zeros(k, jnp.float32)}
        opt = self.make_optimizer(steps)
        state = opt.init(params)
        sampler = noise.KeyStream(key, f"{NAME}/poisson")
        noise_keys = noise.KeyStream(key, f"{NAME}/gradient")
        uncalibrated = dataclasses.replace(self, noise_multiplier=None, num_examples=None)
        update = partial(
            _update_fn(uncalibrated, steps), noise_std=jnp.float32(s * self.l2_grad_clip)
        )
        for t in range(steps):
            gw, gb = rows.sampled_grad_sum(
                params, sampler, t, q, sub_rows=sub_rows, l2_grad_clip=self.l2_grad_clip
            )
            params, state, noisy = update(params, state, gw, gb, noise_keys.base, t)
            if on_step is not None:
                on_step(t, {"weights": gw, "bias": gb}, noisy)
        return {name: np.asarray(v, np.float32) for name, v in params.items()}


@functools.lru_cache(maxsize=16)
def _update_fn(head: DPSGDLogistic, num_steps: int):
    """One jitted step per (optimizer settings, T), so repeated fits compile once."""
    opt = head.make_optimizer(num_steps)
    batch_size = float(head.batch_size)

    @jax.jit
    def update(params, state, gw, gb, noise_base, step, *, noise_std):
        """Add per-class noise to the clipped sum, divide by the public batch size, step."""
        d, k = gw.shape
        z = noise_std * noise.per_class_normal(noise_base, step, num_classes=k, dim=d + 1)
        noisy = {"weights": gw + z[:, :d].T, "bias": gb + z[:, d]}
        grads = jax.tree.map(lambda g: g / batch_size, noisy)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, noisy

    return update
