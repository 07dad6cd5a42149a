"""DP-Newton: one-vs-all logistic regression fitted by T noisy Newton steps.

Form: one-vs-all. Class k has its own binary logistic model w_k on the
augmented feature x~ = [x, b0] (label y_k = 1[y = k]); the prediction is
argmax_k x~ . w_k. A multinomial Newton step needs the (dK) x (dK) Hessian,
about 2.8e12 entries at K=1000, d=1664: infeasible to hold, to noise or to
solve. One-vs-all needs K independent d x d Hessians, which can be built,
noised and solved a block of classes at a time. The price is privacy: every
example touches all K heads, so the sensitivities of the whole release carry
a sqrt(K) factor (below).

Notation (add-or-remove-one neighbouring relation):

* x is the feature vector after `bound_rows`, so ||x|| <= C (C = l2_clip_norm,
  enforced by the transform, strictly, with a 1e-6 relative margin).
* The bias is a constant public feature b0 = `bias_feature` appended to x
  (b0 = 0 means no bias column). So ||x~|| <= R := sqrt(C^2 + b0^2).
* z = W^T x~ (K logits), p = sigmoid(z), Y = one-hot(y).
* Residual r = p - Y: each |r_k| < 1 (p_k in (0, 1)), so ||r|| < sqrt(K)
  before clipping. It is then CLIPPED to L2 norm <= B := rho sqrt(K), rho =
  `residual_clip_fraction` in (0, 1] (with the same 1e-6 relative margin).
  The bound used below is the enforced B, not the a-priori sqrt(K): even
  rho = 1 clips. At the zero init ||r|| = sqrt(K)/2 exactly (every p_k =
  1/2), and it shrinks as the heads fit, so rho = 1/2 changes nothing at the
  first step and halves the gradient noise.
* Hessian weights a_k = p_k (1 - p_k) = sigmoid'(z_k), clipped to [0, 1/4]
  (the analytic maximum; the clip makes it hold for floats too).

Releases, at every Newton step t = 0..T-1 (full batch: every example enters
each release of each step exactly once):

* ``gradient`` G = sum_i x~_i r_i^T, a (d+1) x K matrix; column k is the
  gradient of head k's logistic loss. One example adds x~ r^T, Frobenius norm
  ||x~|| ||r|| <= R B. Noise: iid N(0, (s_g R B)^2) per entry; column k is
  drawn with key (seed, "dp_newton/gradient", class k, step t).
* ``hessian`` H_k = sum_i a_ik x~_i x~_i^T for all K classes. One example adds
  a_k x~ x~^T to every H_k; the Frobenius norm of all K additions together is
  ||x~||^2 sqrt(sum_k a_k^2) <= R^2 sqrt(K) / 4. Noise: iid N(0, (s_h R^2
  sqrt(K)/4)^2) on every entry of the full (d+1) x (d+1) matrix H_k, with key
  (seed, "dp_newton/hessian", class k, step t); then symmetrised (E + E^T)/2,
  which is post-processing and halves the off-diagonal variance.

Each release is a Gaussian mechanism with noise multiplier s = stddev /
sensitivity (independent of K, d and N, so calibration needs no data). Step t
uses the weights W_t, which are post-processing of steps < t (adaptive
composition). The whole head is

    SelfComposedDpEvent(ComposedDpEvent([GaussianDpEvent(s_g),
                                         GaussianDpEvent(s_h)]), T)

with s_h = hessian_noise_ratio * s_g; calibration finds s_g.

Post-processing, per class (public quantities only, never N): project the
noisy Hessian onto the PSD cone (clip negative eigenvalues), add
lambda I with lambda = ridge_lambda + ridge_noise_factor * sigma_h *
sqrt(d+1), sigma_h = s_h R^2 sqrt(K)/4 (the DP-LS rule: damping tied to the
spectral scale of the Hessian noise), and add the public L2 penalty mu =
`l2_penalty` of the objective sum_i loss + mu/2 ||w||^2 to both:

    w_k <- w_k - step_size * (PSD(H_k) + (lambda + mu) I)^-1 (g_k + mu w_k).

Zero init; at W = 0 the first step is a ridge regression onto 4 (Y - 1/2).

Memory and passes: statistics are streamed chunk by chunk. Classes are
processed in blocks of at most `hessian_class_block` classes, never more than
`max_hessian_bytes` of float32 Hessian accumulators (block (d+1)^2 4 bytes),
so K d^2 floats are never held at once: one pass over the data per block per
step, the block's systems solved before the next block. All blocks of a step
use the same W_t. The bounded, augmented features are cached in memory only
when that cache (padded rows x (d+1) x 4 bytes) fits `max_in_memory_bytes`;
otherwise every pass re-reads the store.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from functools import partial

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.heads.dp_ls import solve_ridge_psd
from pipeline_lib.heads.stats import padded_chunks
from pipeline_lib.privacy import accounting, noise
from pipeline_lib.privacy.clipping import FEATURE_TRANSFORMS, bound_rows

_SHRINK = 1.0 - 1e-6  # margin so float rounding never lets a clipped norm exceed its bound
GRADIENT_RELEASE = "dp_newton/gradient"
HESSIAN_RELEASE = "dp_newton/hessian"
_HESSIAN_BYTES_PER_ENTRY = 4  # float32 accumulators


def augmented_dim(feature_dim: int, bias_feature: float) -> int:
    return feature_dim + (1 if bias_feature > 0 else 0)


def hessian_class_block_size(
    *,
    augmented_dim: int,
    num_classes: int,
    max_hessian_bytes: float,
    hessian_class_block: int | None = None,
) -> int:
    """Classes per block: the most whose Hessian accumulators fit the byte budget.

    Capped by `hessian_class_block` when given and by K. A block of b classes
    holds b (d+1)^2 float32 accumulators.
    """
    per_class = augmented_dim**2 * _HESSIAN_BYTES_PER_ENTRY
    fit = int(max_hessian_bytes // per_class)
    if fit < 1:
        raise ValueError(
            f"dp_newton: max_hessian_bytes={max_hessian_bytes:.3g} is below one class's "
            f"Hessian ({per_class} bytes at augmented dimension {augmented_dim}); raise it"
        )
    block = min(fit, num_classes)
    if hessian_class_block is not None:
        block = min(block, hessian_class_block)
    # Balance the blocks so the last one is not mostly padding.
    num_blocks = -(-num_classes // block)
    return -(-num_classes // num_blocks)


def class_blocks(num_classes: int, block: int) -> list[np.ndarray]:
    return [np.arange(lo, min(lo + block, num_classes)) for lo in range(0, num_classes, block)]


@partial(jax.jit, static_argnames=("l2_clip_norm", "transform", "bias_feature"))
def augment_rows(x, mask, *, l2_clip_norm, transform, bias_feature):
    """[bound_rows(x), b0] on real rows, zero rows on padding."""
    xb = bound_rows(x, l2_clip_norm, transform)
    if bias_feature > 0:
        ones = jnp.full((x.shape[0], 1), bias_feature, jnp.float32)
        xb = jnp.concatenate([xb, ones], axis=1)
    return xb * mask[:, None]


def clipped_residuals(logits, labels, *, num_classes, residual_bound):
    """r = sigmoid(z) - onehot(y), each row clipped to L2 norm <= residual_bound."""
    r = jax.nn.sigmoid(logits) - jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    norms = jnp.linalg.norm(r, axis=1, keepdims=True)
    target = jnp.float32(residual_bound * _SHRINK)
    return r * jnp.minimum(1.0, target / jnp.where(norms > 0, norms, 1.0))


def hessian_weights(logits):
    """sigmoid'(z) = sigmoid(z) sigmoid(-z), clipped to its analytic maximum 1/4."""
    return jnp.clip(jax.nn.sigmoid(logits) * jax.nn.sigmoid(-logits), 0.0, 0.25)


@partial(jax.jit, static_argnames=("num_classes", "residual_bound"), donate_argnums=(0, 1))
def accumulate_chunk(grad, hess, xa, labels, mask, weights, classes, *, num_classes, residual_bound):
    """Add one chunk's gradient and Hessian sums for the block `classes` (shape (b,)).

    xa: (n, d+1) augmented rows (zero on padding); weights: (d+1, K).
    grad: (d+1, b) and hess: (b, d+1, d+1) accumulators, updated in place.
    """
    logits = xa @ weights
    r = clipped_residuals(logits, labels, num_classes=num_classes, residual_bound=residual_bound)
    r = r * mask[:, None]
    a = hessian_weights(logits[:, classes]) * mask[:, None]
    grad = grad + xa.T @ r[:, classes]

    def one_class(j, h):  # one (d+1) x (d+1) product at a time: no (b, n, d+1) temporary
        return h.at[j].add((xa * a[:, j][:, None]).T @ xa)

    hess = jax.lax.fori_loop(0, classes.shape[0], one_class, hess)
    return grad, hess


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPNewton:
    """Public hyperparameters of DP-Newton; `noise_multiplier` (s_g) is set by `calibrate`."""

    l2_clip_norm: float = 1.0
    feature_transform: str = "normalize"
    bias_feature: float = 1.0  # b0, the constant appended feature; 0 = no bias
    num_steps: int = 3  # T
    step_size: float = 1.0
    l2_penalty: float = 0.0  # mu, on the summed loss
    ridge_lambda: float = 1e-3
    ridge_noise_factor: float = 0.25
    residual_clip_fraction: float = 0.5  # rho: ||r|| <= rho sqrt(K)
    hessian_noise_ratio: float = 1.0  # s_h / s_g
    hessian_class_block: int | None = None
    max_hessian_bytes: float = 1e9
    max_in_memory_bytes: float = 2e9
    accountant: str = "pld"
    noise_multiplier: float | None = None  # s_g; s_h = hessian_noise_ratio * s_g

    name = "dp_newton"
    private = True

    def __post_init__(self):
        def need(ok: bool, key: str, rule: str):
            if not ok:
                raise ValueError(f"dp_newton: {key} {rule}, got {getattr(self, key)!r}")

        need(self.l2_clip_norm > 0, "l2_clip_norm", "must be > 0")
        if self.feature_transform not in FEATURE_TRANSFORMS:
            raise ValueError(
                f"dp_newton: feature_transform {self.feature_transform!r} unknown; "
                f"use one of {FEATURE_TRANSFORMS}"
            )
        need(self.bias_feature >= 0, "bias_feature", "must be >= 0 (0 = no bias)")
        need(
            isinstance(self.num_steps, int) and self.num_steps >= 1,
            "num_steps",
            "must be an integer >= 1",
        )
        need(self.step_size > 0, "step_size", "must be > 0")
        need(self.l2_penalty >= 0, "l2_penalty", "must be >= 0")
        need(self.ridge_lambda >= 0, "ridge_lambda", "must be >= 0")
        need(self.ridge_noise_factor >= 0, "ridge_noise_factor", "must be >= 0")
        need(0 < self.residual_clip_fraction <= 1, "residual_clip_fraction", "must be in (0, 1]")
        need(self.hessian_noise_ratio > 0, "hessian_noise_ratio", "must be > 0")
        need(
            self.hessian_class_block is None
            or (isinstance(self.hessian_class_block, int) and self.hessian_class_block >= 1),
            "hessian_class_block",
            "must be None or an integer >= 1",
        )
        need(self.max_hessian_bytes > 0, "max_hessian_bytes", "must be > 0")
        need(self.max_in_memory_bytes >= 0, "max_in_memory_bytes", "must be >= 0")
        if self.accountant not in accounting.ACCOUNTANTS:
            raise ValueError(
                f"dp_newton: accountant must be one of {accounting.ACCOUNTANTS}, "
                f"got {self.accountant!r}"
            )
        if self.noise_multiplier is not None:
            need(self.noise_multiplier > 0, "noise_multiplier", "must be > 0")

    # --- privacy -------------------------------------------------------------------------

    def hyperparameters(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "noise_multiplier"
        }

    def noise_multipliers(self) -> dict[str, float]:
        s = self._require_calibrated()
        return {"gradient": s, "hessian": self.hessian_noise_ratio * s}

    def dp_event(self) -> dp_accounting.DpEvent:
        return self._event(self._require_calibrated())

    def _event(self, s: float) -> dp_accounting.DpEvent:
        step = dp_accounting.ComposedDpEvent(
            [
                dp_accounting.GaussianDpEvent(s),
                dp_accounting.GaussianDpEvent(self.hessian_noise_ratio * s),
            ]
        )
        return dp_accounting.SelfComposedDpEvent(step, self.num_steps)

    def _require_calibrated(self) -> float:
        if self.noise_multiplier is None:
            raise ValueError("dp_newton: not calibrated; call .calibrate(epsilon=, delta=) first")
        return self.noise_multiplier

    def calibrate(self, *, epsilon: float, delta: float) -> DPNewton:
        # 2T composed Gaussians are exactly one Gaussian with multiplier
        # s / sqrt(T (1 + 1/r^2)): start the bracket search right there.
        r = self.hessian_noise_ratio
        guess = dp_accounting.get_sigma_gaussian(epsilon, delta) * math.sqrt(
            self.num_steps * (1 + 1 / r**2)
        )
        cal = accounting.calibrate_noise_scale(
            self._event,
            target_epsilon=epsilon,
            target_delta=delta,
            accountant=self.accountant,
            initial_guess=guess,
        )
        return dataclasses.replace(self, noise_multiplier=cal.noise_scale)

    def bias_value(self) -> float:
        """b0 as the float32 actually appended (the norm bound uses this value)."""
        return float(np.float32(self.bias_feature))

    def sensitivities(self, num_classes: int) -> dict[str, float]:
        """L2 sensitivities of one step's releases over all K classes together."""
        r2 = self.l2_clip_norm**2 + self.bias_value() ** 2
        b = self.residual_clip_fraction * math.sqrt(num_classes)
        return {"gradient": math.sqrt(r2) * b, "hessian": r2 * math.sqrt(num_classes) / 4.0}

    def noise_stddevs(self, num_classes: int) -> dict[str, float]:
        m, sens = self.noise_multipliers(), self.sensitivities(num_classes)
        return {key: m[key] * sens[key] for key in m}

    def damping(self, feature_dim: int, num_classes: int) -> float:
        """lambda: public, tied to the spectral scale of the Hessian noise."""
        d_aug = augmented_dim(feature_dim, self.bias_feature)
        sigma_h = self.noise_stddevs(num_classes)["hessian"]
        return self.ridge_lambda + self.ridge_noise_factor * sigma_h * math.sqrt(d_aug)

    def release(
        self,
        gradient: np.ndarray,
        hessian: np.ndarray,
        *,
        class_index: int,
        step: int,
        seed: int,
        num_classes: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noisy (gradient, symmetrised Hessian) of one class at one step, float64.

        Each draw has its own key (release name, class index, step).
        """
        sd = self.noise_stddevs(num_classes)
        dim = gradient.shape[0]
        e = noise.gaussian(seed, GRADIENT_RELEASE, (dim,), sd["gradient"], index=class_index, step=step)
        f = noise.gaussian(
            seed, HESSIAN_RELEASE, (dim, dim), sd["hessian"], index=class_index, step=step
        )
        f = np.asarray(f, np.float64)
        noisy_g = np.asarray(gradient, np.float64) + np.asarray(e, np.float64)
        noisy_h = np.asarray(hessian, np.float64) + (f + f.T) / 2.0
        return noisy_g, noisy_h

    # --- fitting -------------------------------------------------------------------------

    def fit(self, data, *, seed: int) -> dict[str, np.ndarray]:
        """T noisy Newton steps from zero; weights (d, K) and bias (K,), float32."""
        self._require_calibrated()
        d, k = int(data.feature_dim), int(data.num_classes)
        d_aug = augmented_dim(d, self.bias_feature)
        block = hessian_class_block_size(
            augmented_dim=d_aug,
            num_classes=k,
            max_hessian_bytes=self.max_hessian_bytes,
            hessian_class_block=self.hessian_class_block,
        )
        source = self._chunk_source(data)
        lam = self.damping(d, k)
        mu = self.l2_penalty
        w = np.zeros((d_aug, k), np.float64)
        for t in range(self.num_steps):
            w_now = jnp.asarray(w, jnp.float32)
            w_next = w.copy()
            for classes in class_blocks(k, block):
                grad, hess = self.exact_statistics(source, w_now, classes, data.num_examples, k)
                for j, c in enumerate(classes):
                    g, h = self.release(
                        np.asarray(grad[:, j]),
                        np.asarray(hess[j]),
                        class_index=int(c),
                        step=t,
                        seed=seed,
                        num_classes=k,
                    )
                    direction = solve_ridge_psd(h, (g + mu * w[:, c])[:, None], lam + mu)[:, 0]
                    w_next[:, c] = w[:, c] - self.step_size * direction
                del grad, hess
            w = w_next
        bias = self.bias_value() * w[d] if d_aug > d else np.zeros(k)
        return {"weights": w[:d].astype(np.float32), "bias": bias.astype(np.float32)}

    def exact_statistics(
        self,
        source: Callable[[], Iterator[tuple]],
        weights: jnp.ndarray,
        classes: np.ndarray,
        num_examples: int,
        num_classes: int,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """One pass: un-noised gradient (d+1, b) and Hessians (b, d+1, d+1) of a block.

        Never released as such; `release` adds the noise. Blocks are balanced,
        so their sizes differ by at most one (at most two compiled shapes).
        """
        d_aug = weights.shape[0]
        grad = jnp.zeros((d_aug, len(classes)), jnp.float32)
        hess = jnp.zeros((len(classes), d_aug, d_aug), jnp.float32)
        seen = 0
        cls = jnp.asarray(classes, jnp.int32)
        bound = self.residual_clip_fraction * math.sqrt(num_classes)
        for xa, labels, mask in source():
            grad, hess = accumulate_chunk(
                grad,
                hess,
                xa,
                labels,
                mask,
                weights,
                cls,
                num_classes=num_classes,
                residual_bound=bound,
            )
            seen += int(np.sum(np.asarray(mask)))
        if seen != num_examples:  # one pass, each example once
            raise AssertionError(f"dp_newton pass saw {seen} examples, data has {num_examples}")
        return grad, hess

    def _chunk_source(self, data) -> Callable[[], Iterator[tuple]]:
        """Padded (augmented rows, labels, mask) chunks: cached if they fit, else streamed."""
        kw = dict(
            l2_clip_norm=float(self.l2_clip_norm),
            transform=self.feature_transform,
            bias_feature=self.bias_value(),
        )

        def stream():
            for feats, labels, mask in padded_chunks(data):
                yield augment_rows(feats, mask, **kw), jnp.asarray(labels), jnp.asarray(mask)

        d_aug = augmented_dim(int(data.feature_dim), self.bias_feature)
        cache_bytes = data.num_chunks * data.chunk_rows * d_aug * 4
        if cache_bytes > self.max_in_memory_bytes:
            return stream
        cache = list(stream())
        return lambda: iter(cache)
