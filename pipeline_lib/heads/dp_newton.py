"""DP-Newton: one-vs-all logistic regression fitted by T noisy Newton steps.

Form: one-vs-all. Class k has its own binary logistic model w_k on the
(augmented) feature x~ with label y_k = 1[y = k]; the prediction is
argmax_k x~ . w_k. A multinomial Newton step needs the (dK) x (dK) Hessian,
about 2.8e12 entries at K=1000, d=1664: infeasible to hold, to noise or to
solve. One-vs-all needs K independent d x d Hessians, which are built, noised
and solved a block of classes at a time. The price is privacy: every example
touches all K heads, so the sensitivities of the per-class releases carry a
sqrt(K) factor (below), which clipping to public fractions of it reduces.

Notation (add-or-remove-one neighbouring relation):

* x is the feature vector after `bound_rows`, so ||x|| <= C (C = l2_clip_norm,
  enforced by the transform, strictly, with a 1e-6 relative margin).
* Bias: optional. A constant public feature b0 = `bias_feature` is appended,
  x~ = [x, b0] (b0 = 0, the default, appends nothing: no bias). So
  ||x~|| <= R := sqrt(C^2 + b0^2). The default has no bias because b0 raises
  R^2, hence the Hessian noise, by (C^2 + b0^2) / C^2, and with normalised
  features (all of norm C) a direction of W already acts as an offset.
* z = W^T x~ (K logits), p = sigmoid(z), Y = one-hot(y).
* Residual r = p - Y: each |r_k| < 1 (p_k in (0, 1)), so ||r|| < sqrt(K)
  a priori. It is CLIPPED to L2 norm <= B := rho sqrt(K), rho =
  `residual_clip_fraction` in (0, 1] (1e-6 relative margin): the bound below
  is the enforced B, not the a-priori sqrt(K). Even rho = 1 clips.
* Hessian weights a_k = p_k (1 - p_k) = sigmoid'(z_k) <= 1/4, so a priori
  ||a|| <= sqrt(K)/4 over the K classes. Each a_k is clipped to [0, 1/4] (the
  analytic maximum, enforced for floats too) and the vector a to L2 norm <=
  A := rho_h sqrt(K)/4, rho_h = `hessian_clip_fraction` in (0, 1].

Releases. Newton step t = 0..T-1 uses W_t, which is post-processing of
the steps before it (adaptive composition). Full batch: every example enters
each release exactly once.

* ``gradient`` (steps with per-class releases) G = sum_i x~_i r_i^T, a
  (d+1) x K matrix; column k is the gradient of head k's logistic loss. One
  example adds x~ r^T, Frobenius norm ||x~|| ||r|| <= R B. Noise: iid
  N(0, (s_g R B)^2) per entry; column k is drawn with key
  (key, "dp_newton/gradient", class k, step t).
* ``hessian`` H_k = sum_i a_ik x~_i x~_i^T for all K classes. One example
  adds a_k x~ x~^T to every H_k; the Frobenius norm of all K additions
  together is ||x~||^2 ||a|| <= R^2 A (= C^2 sqrt(K)/4 with rho_h = 1, b0 = 0:
  C^2/4 per class). Noise: iid N(0, (s_h R^2 A)^2) on every entry of the full
  (d+1) x (d+1) matrix H_k, key (key, "dp_newton/hessian", class k, step t),
  then symmetrised (E + E^T)/2: post-processing that halves the off-diagonal
  variance.
* Step 0 with ``shared_first_step`` (default). At W_0 = 0 every p_k = 1/2
  exactly, so every a_k = 1/4 and r = 1/2 - Y whatever the data: H_k =
  X~^T X~ / 4 for every k, and g_k = (1/2) X~^T 1 - (X~^T Y)_k with
  X~^T 1 = sum_k (X~^T Y)_k (one-hot rows sum to 1). Step 0 therefore
  releases only ``gram`` X~^T X~ (one example adds x~ x~^T, Frobenius norm
  ||x~||^2 <= R^2; noise N(0, (s_h R^2)^2) per entry, one draw with key
  (key, "dp_newton/gram", 0, 0), symmetrised) and ``label_sums`` X~^T Y (one
  example adds x~ e_y^T, norm ||x~|| <= R; noise N(0, (s_g R)^2), column k
  with key (key, "dp_newton/label_sums", class k, 0)), a sqrt(K)-fold (or
  more) smaller sensitivity than the per-class releases, and one
  eigendecomposition instead of K. (This makes step 0 a DP-LS solve onto the
  targets 4 (Y - 1/2); it is still the exact Newton step from zero, not a
  separate warm start.) Without it, step 0 uses the per-class releases,
  whose clip factors at W = 0 are public constants (||r|| = sqrt(K)/2 and
  ||a|| = sqrt(K)/4 for every example), and the released statistics are
  divided by them (post-processing), so both modes take the same step.

Each release is a Gaussian mechanism with noise multiplier s = stddev /
sensitivity (independent of K, d and N, so calibration needs no data). Each
step releases one gradient-type (s_g) and one Hessian-type (s_h) statistic,
so the whole head is T self-composed steps of two composed Gaussians,
`privacy.events.dp_newton_event(s_g, hessian_noise_ratio, T)`, with
s_h = hessian_noise_ratio * s_g; calibration finds s_g. Kernel calls:
`privacy.clipping.bound_rows` (features), `privacy.clipping.clip_l2`
(residual and Hessian-weight rows), `privacy.noise.gaussian` (every release).

Post-processing, per class, from public quantities only (never N): project
the noisy Hessian onto the PSD cone (clip negative eigenvalues), add lambda I
with lambda = ridge_lambda + ridge_noise_factor * sigma * sqrt(d+1), sigma the
per-entry noise stddev of that step's Hessian (s_h R^2 A, or s_h R^2 / 4 for
the shared first step's X~^T X~ / 4): the DP-LS rule, damping tied to the
spectral scale of the noise. The public L2 penalty mu = `l2_penalty` of the
objective sum_i loss_i + mu/2 ||w||^2 enters both gradient and Hessian:

    w_k <- w_k - step_size * (PSD(H_k) + (lambda + mu) I)^-1 (g_k + mu w_k).

Memory and passes: statistics are streamed chunk by chunk. Classes are
processed in blocks of at most `hessian_class_block` classes, and never more
than fit in `max_hessian_bytes` of float32 Hessian accumulators (b (d+1)^2 4
bytes), so K d^2 floats are never held at once: one pass over the data per
block per step, each block's systems solved before the next block. All blocks
of a step use the same W_t. The bounded, augmented features are cached in
memory only when that cache (padded rows x (d+1) x 4 bytes) fits
`max_in_memory_bytes`; otherwise every pass re-reads the store.

Cost: each per-class step after the first computes K Hessians over N rows.
H_k is symmetric, so only its block upper triangle is accumulated (row tiles
of `HESSIAN_TILE_ROWS`; 60 % of the full product's 2 N (d+1)^2 FLOPs per class
at d+1 = 1280) and mirrored once per pass. This changes float rounding only:
the released quantity, its sensitivity and its noise are the same. At N =
1.28M, d = 1280, K = 1000 one step is still about 2.5e15 FLOPs (7 passes of
blocks of 143 classes at the default 1 GB budget): see benchmarks/RESULTS.md.

Defaults and how they were chosen (README, "How each default was chosen"):
``num_steps`` is a compute budget, ``step_size`` = 1 is Newton's own step and
``hessian_noise_ratio`` = 1 an equal split (public rules). The clip fractions (code
defaults 0.3 and 0.35) and ``ridge_noise_factor`` (0.25) were set in development on a
holdout of the Fashion-MNIST training split, which no epsilon covers; the shipped
experiment searches {0.25, 1} x {0.25, 1} x {0.125, 0.5} privately (1 is the a-priori
bound, i.e. no extra clipping).
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

from pipeline_lib.heads.base import (
    ACCOUNTANT,
    BOOLEAN,
    FEATURE_BOUND,
    NOISE_MULTIPLIER,
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    PrivateHead,
    Rule,
    check_fields,
    in_interval,
    optional,
)
from pipeline_lib.heads.linear import padded_chunks, solve_ridge_psd
from pipeline_lib.privacy import accounting, events, noise
from pipeline_lib.privacy.clipping import SHRINK, bound_rows, check_bound, clip_l2

GRADIENT_RELEASE = "dp_newton/gradient"
HESSIAN_RELEASE = "dp_newton/hessian"
GRAM_RELEASE = "dp_newton/gram"
LABEL_SUMS_RELEASE = "dp_newton/label_sums"
_HESSIAN_BYTES_PER_ENTRY = 4  # float32 accumulators
HESSIAN_TILE_ROWS = 256  # row tile of the block upper triangle (see accumulate_chunk)


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


def augment_rows(x, mask, *, l2_clip_norm, transform, bias_feature):
    """[bound_rows(x), b0] on real rows, zero rows on padding."""
    b0 = float(bias_feature)
    if not 0 <= b0 < math.inf:
        raise ValueError(f"bias_feature must be finite and >= 0, got {bias_feature!r}")
    return _augment_rows(
        x,
        mask,
        l2_clip_norm=check_bound("l2_clip_norm", l2_clip_norm),
        transform=transform,
        bias_feature=b0,
        with_bias=b0 > 0,
    )


# C and b0 are traced (one program for every value); whether there is a bias column is not.
@partial(jax.jit, static_argnames=("transform", "with_bias"))
def _augment_rows(x, mask, *, l2_clip_norm, transform, bias_feature, with_bias):
    xb = bound_rows(x, l2_clip_norm, transform)
    if with_bias:
        ones = jnp.full((x.shape[0], 1), bias_feature, jnp.float32)
        xb = jnp.concatenate([xb, ones], axis=1)
    return xb * mask[:, None]


def clipped_residuals(logits, labels, *, num_classes, residual_bound):
    """r = sigmoid(z) - onehot(y), each row clipped to L2 norm <= residual_bound."""
    r = jax.nn.sigmoid(logits) - jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return clip_l2(r, residual_bound)


def hessian_weights(logits, *, hessian_weight_bound):
    """a = sigmoid'(z) = sigmoid(z) sigmoid(-z), each entry clipped to its analytic
    maximum 1/4, then each row (all K classes) clipped to L2 norm <= hessian_weight_bound."""
    a = jnp.clip(jax.nn.sigmoid(logits) * jax.nn.sigmoid(-logits), 0.0, 0.25)
    return clip_l2(a, hessian_weight_bound)


def hessian_tiles(dim: int, tile_rows: int = HESSIAN_TILE_ROWS) -> list[tuple[int, int]]:
    """Row tiles [lo, hi) of a (dim x dim) Hessian; tile i is computed for columns >= lo."""
    return [(lo, min(lo + tile_rows, dim)) for lo in range(0, dim, tile_rows)]


def hessian_tile_flop_fraction(dim: int, tile_rows: int = HESSIAN_TILE_ROWS) -> float:
    """FLOPs of the block upper triangle over those of the full (dim x dim) product."""
    return sum((hi - lo) * (dim - lo) for lo, hi in hessian_tiles(dim, tile_rows)) / dim**2


@partial(
    jax.jit,
    static_argnames=("num_classes", "tile_rows"),  # the two bounds are traced
    donate_argnums=(0, 1),
)
def accumulate_chunk(
    grad,
    hess,
    xa,
    labels,
    mask,
    weights,
    classes,
    *,
    num_classes,
    residual_bound,
    hessian_weight_bound,
    tile_rows=HESSIAN_TILE_ROWS,
):
    """Add one chunk's gradient and Hessian sums for the block `classes` (shape (b,)).

    xa: (n, d+1) augmented rows (zero on padding); weights: (d+1, K).
    grad: (d+1, b) and hess: (b, d+1, d+1) accumulators, updated in place.

    H_k is symmetric, so only its block upper triangle is accumulated: row tile
    [lo, hi) gets (a_k x~)[:, lo:hi]^T x~[:, lo:], about (1 + 1/tiles) / 2 of the
    full product's FLOPs. Entries left of a row's tile stay zero until
    `mirror_hessians` copies them from their transposes after the last chunk.
    """
    logits = xa @ weights
    r = clipped_residuals(logits, labels, num_classes=num_classes, residual_bound=residual_bound)
    r = r * mask[:, None]
    a = hessian_weights(logits, hessian_weight_bound=hessian_weight_bound)
    a = a[:, classes] * mask[:, None]
    grad = grad + xa.T @ r[:, classes]
    tiles = hessian_tiles(xa.shape[1], tile_rows)
    # The column slices are the same for every class: cut them once per chunk.
    rows_of = [xa[:, lo:hi] for lo, hi in tiles]
    cols_of = [xa[:, lo:] for lo, _ in tiles]

    def one_class(j, h):  # one class at a time: no (b, n, d+1) temporary
        aj = a[:, j][:, None]
        for (lo, hi), xr, xc in zip(tiles, rows_of, cols_of, strict=True):
            h = h.at[j, lo:hi, lo:].add((xr * aj).T @ xc)
        return h

    hess = jax.lax.fori_loop(0, classes.shape[0], one_class, hess)
    return grad, hess


@partial(jax.jit, static_argnames=("tile_rows",), donate_argnums=(0,))
def mirror_hessians(hess, *, tile_rows=HESSIAN_TILE_ROWS):
    """Fill each Hessian's entries below its row tiles from their transposes.

    Entry (i, j) was accumulated iff j >= lo(i), the first column of i's row
    tile; otherwise (j, i) was (lo(j) <= j < lo(i) <= i). The result is the
    full sum_i a_ik x~_i x~_i^T (exactly symmetric outside the diagonal tiles,
    which are full products, symmetric up to rounding as before).
    """
    dim = hess.shape[1]
    lo = (jnp.arange(dim) // tile_rows) * tile_rows
    kept = jnp.arange(dim)[None, :] >= lo[:, None]

    def one_class(j, h):
        return h.at[j].set(jnp.where(kept, h[j], h[j].T))

    return jax.lax.fori_loop(0, hess.shape[0], one_class, hess)


@partial(jax.jit, static_argnames=("num_classes",), donate_argnums=(0, 1))
def accumulate_gram_chunk(gram, label_sums, xa, labels, *, num_classes):
    """Add one chunk's X~^T X~ (d+1, d+1) and X~^T Y (d+1, K); xa is zero on padding."""
    gram = gram + xa.T @ xa
    label_sums = label_sums + jax.ops.segment_sum(xa, labels, num_segments=num_classes).T
    return gram, label_sums


FRACTION = in_interval(0, 1, closed_low=False, closed_high=True)
FIELD_RULES = {
    **FEATURE_BOUND,
    "bias_feature": Rule(NONNEGATIVE.ok, "must be >= 0 (0 = no bias)"),
    "num_steps": POSITIVE_INT,
    "step_size": POSITIVE,
    "l2_penalty": NONNEGATIVE,
    "ridge_lambda": NONNEGATIVE,
    "ridge_noise_factor": NONNEGATIVE,
    "residual_clip_fraction": FRACTION,
    "hessian_clip_fraction": FRACTION,
    "hessian_noise_ratio": POSITIVE,
    "shared_first_step": BOOLEAN,
    "hessian_class_block": optional(POSITIVE_INT, "all classes at once"),
    "max_hessian_bytes": POSITIVE,
    "max_in_memory_bytes": NONNEGATIVE,
    **ACCOUNTANT,
    **NOISE_MULTIPLIER,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPNewton(PrivateHead):
    """Public hyperparameters of DP-Newton; `noise_multiplier` (s_g) is set by `calibrate`."""

    l2_clip_norm: float = 1.0
    feature_transform: str = "normalize"
    bias_feature: float = 0.0  # b0, the constant appended feature; 0 = no bias
    num_steps: int = 3  # T
    step_size: float = 1.0
    l2_penalty: float = 0.0  # mu, on the summed loss
    ridge_lambda: float = 1e-3
    ridge_noise_factor: float = 0.25
    residual_clip_fraction: float = 0.3  # rho: ||r|| <= rho sqrt(K)
    hessian_clip_fraction: float = 0.35  # rho_h: ||a|| <= rho_h sqrt(K) / 4
    hessian_noise_ratio: float = 1.0  # s_h / s_g
    shared_first_step: bool = True
    hessian_class_block: int | None = None
    max_hessian_bytes: float = 1e9
    max_in_memory_bytes: float = 2e9
    accountant: str = "pld"
    noise_multiplier: float | None = None  # s_g; s_h = hessian_noise_ratio * s_g

    name = "dp_newton"

    def __post_init__(self):
        check_fields(self.name, self, FIELD_RULES)

    # --- privacy -------------------------------------------------------------------------

    def noise_multipliers(self) -> dict[str, float]:
        s = self._require_calibrated()
        return {"gradient": s, "hessian": self.hessian_noise_ratio * s}

    def dp_event(self) -> dp_accounting.DpEvent:
        return self._event(self._require_calibrated())

    def _event(self, s: float) -> dp_accounting.DpEvent:
        return events.dp_newton_event(s, self.hessian_noise_ratio, self.num_steps)

    def _require_calibrated(self) -> float:
        if self.noise_multiplier is None:
            raise ValueError("dp_newton: not calibrated; call .calibrate(epsilon=, delta=) first")
        return self.noise_multiplier

    def calibrate(
        self, *, epsilon: float, delta: float, num_examples: int | None = None
    ) -> DPNewton:
        """Smallest s spending at most (epsilon, delta); N only enters the budget check."""
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
            num_examples=num_examples,
        )
        return dataclasses.replace(self, noise_multiplier=cal.noise_scale)

    def bias_value(self) -> float:
        """b0 as the float32 actually appended (the norm bound uses this value)."""
        return float(np.float32(self.bias_feature))

    def residual_bound(self, num_classes: int) -> float:
        return self.residual_clip_fraction * math.sqrt(num_classes)

    def hessian_weight_bound(self, num_classes: int) -> float:
        return self.hessian_clip_fraction * math.sqrt(num_classes) / 4.0

    def sensitivities(self, num_classes: int) -> dict[str, float]:
        """L2 sensitivity of each release (all K classes together), by release name."""
        r2 = self.l2_clip_norm**2 + self.bias_value() ** 2
        return {
            "gradient": math.sqrt(r2) * self.residual_bound(num_classes),
            "hessian": r2 * self.hessian_weight_bound(num_classes),
            "label_sums": math.sqrt(r2),  # step 0 of the shared first step
            "gram": r2,  # step 0 of the shared first step
        }

    def noise_stddevs(self, num_classes: int) -> dict[str, float]:
        m, sens = self.noise_multipliers(), self.sensitivities(num_classes)
        return {
            "gradient": m["gradient"] * sens["gradient"],
            "hessian": m["hessian"] * sens["hessian"],
            "label_sums": m["gradient"] * sens["label_sums"],
            "gram": m["hessian"] * sens["gram"],
        }

    def first_step_clip_factors(self, num_classes: int) -> tuple[float, float]:
        """Public clip factors of the per-class statistics at W = 0 (gradient, Hessian).

        There ||r|| = sqrt(K)/2 and ||a|| = sqrt(K)/4 for every example, so
        clipping scales every contribution by the same public constant.
        """
        half = math.sqrt(num_classes) / 2.0
        c_r = min(1.0, self.residual_bound(num_classes) * SHRINK / half)
        c_h = min(1.0, self.hessian_weight_bound(num_classes) * SHRINK / (half / 2.0))
        return c_r, c_h

    def damping(self, feature_dim: int, num_classes: int, *, first_step: bool = False) -> float:
        """lambda: public, tied to the spectral scale of the Hessian noise of that step."""
        d_aug = augmented_dim(feature_dim, self.bias_feature)
        sd = self.noise_stddevs(num_classes)
        sigma = sd["hessian"]
        if first_step and self.shared_first_step:
            sigma = sd["gram"] / 4.0
        elif first_step:
            sigma = sd["hessian"] / self.first_step_clip_factors(num_classes)[1]
        return self.ridge_lambda + self.ridge_noise_factor * sigma * math.sqrt(d_aug)

    def release(
        self,
        gradient: np.ndarray,
        hessian: np.ndarray,
        *,
        class_index: int,
        step: int,
        key: noise.NoiseKey,
        num_classes: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noisy (gradient, symmetrised Hessian) of one class at one step, float64.

        Each draw has its own key (release name, class index, step).
        """
        sd = self.noise_stddevs(num_classes)
        dim = gradient.shape[0]
        e = noise.gaussian(
            key, GRADIENT_RELEASE, (dim,), sd["gradient"], index=class_index, step=step
        )
        f = noise.gaussian(
            key, HESSIAN_RELEASE, (dim, dim), sd["hessian"], index=class_index, step=step
        )
        f = np.asarray(f, np.float64)
        noisy_g = np.asarray(gradient, np.float64) + np.asarray(e, np.float64)
        noisy_h = np.asarray(hessian, np.float64) + (f + f.T) / 2.0
        return noisy_g, noisy_h

    def release_first_step(
        self, gram: np.ndarray, label_sums: np.ndarray, *, key: noise.NoiseKey
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noisy (symmetrised X~^T X~, X~^T Y) for the shared first step, float64.

        One Gram draw (one release, accounted once); column k of X~^T Y has
        its own key (class k).
        """
        dim, k = label_sums.shape
        sd = self.noise_stddevs(k)
        e = np.asarray(noise.gaussian(key, GRAM_RELEASE, (dim, dim), sd["gram"]), np.float64)
        f = noise.gaussian_per_class(key, LABEL_SUMS_RELEASE, k, dim, sd["label_sums"])
        noisy_gram = np.asarray(gram, np.float64) + (e + e.T) / 2.0
        noisy_sums = np.asarray(label_sums, np.float64) + np.asarray(f, np.float64).T
        return noisy_gram, noisy_sums

    # --- fitting -------------------------------------------------------------------------

    def fit(self, data, *, key: noise.NoiseKey) -> dict[str, np.ndarray]:
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
        source = self.chunk_source(data)
        mu = self.l2_penalty
        w = np.zeros((d_aug, k), np.float64)
        first = 0
        if self.shared_first_step:
            gram, label_sums = self.exact_first_step_statistics(source, d_aug, data.num_examples, k)
            gram, label_sums = self.release_first_step(gram, label_sums, key=key)
            # At W = 0: every Hessian weight is 1/4 and the residual is 1/2 - Y.
            grads = 0.5 * label_sums.sum(axis=1, keepdims=True) - label_sums
            lam = self.damping(d, k, first_step=True)
            w = -self.step_size * solve_ridge_psd(gram / 4.0, grads, lam + mu)
            first = 1
        for t in range(first, self.num_steps):
            lam = self.damping(d, k, first_step=t == 0)
            c_r, c_h = self.first_step_clip_factors(k) if t == 0 else (1.0, 1.0)
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
                        key=key,
                        num_classes=k,
                    )
                    g, h = g / c_r, h / c_h  # undo the public uniform clip at W = 0
                    direction = solve_ridge_psd(h, (g + mu * w[:, c])[:, None], lam + mu)[:, 0]
                    w_next[:, c] = w[:, c] - self.step_size * direction
                del grad, hess
            w = w_next
        bias = self.bias_value() * w[d] if d_aug > d else np.zeros(k)
        return {"weights": w[:d].astype(np.float32), "bias": bias.astype(np.float32)}

    def exact_first_step_statistics(
        self,
        source: Callable[[], Iterator[tuple]],
        augmented_dim: int,
        num_examples: int,
        num_classes: int,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """One pass: un-noised X~^T X~ (d+1, d+1) and X~^T Y (d+1, K)."""
        gram = jnp.zeros((augmented_dim, augmented_dim), jnp.float32)
        label_sums = jnp.zeros((augmented_dim, num_classes), jnp.float32)
        seen = 0
        for xa, labels, _, rows in source():
            gram, label_sums = accumulate_gram_chunk(
                gram, label_sums, xa, labels, num_classes=num_classes
            )
            seen += rows
        _check_one_pass(seen, num_examples)
        return gram, label_sums

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
        for xa, labels, mask, rows in source():
            grad, hess = accumulate_chunk(
                grad,
                hess,
                xa,
                labels,
                mask,
                weights,
                cls,
                num_classes=num_classes,
                residual_bound=self.residual_bound(num_classes),
                hessian_weight_bound=self.hessian_weight_bound(num_classes),
                tile_rows=HESSIAN_TILE_ROWS,
            )
            seen += rows
        _check_one_pass(seen, num_examples)
        return grad, mirror_hessians(hess, tile_rows=HESSIAN_TILE_ROWS)

    def chunk_source(self, data) -> Callable[[], Iterator[tuple]]:
        """Padded (augmented rows, labels, mask, real rows) chunks: cached if they fit,
        else streamed from `data` on every pass."""
        kw = dict(
            l2_clip_norm=float(self.l2_clip_norm),
            transform=self.feature_transform,
            bias_feature=self.bias_value(),
        )

        def stream():
            for feats, labels, mask in padded_chunks(data):
                xa = augment_rows(feats, mask, **kw)
                yield xa, jnp.asarray(labels), jnp.asarray(mask), int(mask.sum())

        d_aug = augmented_dim(int(data.feature_dim), self.bias_feature)
        cache_bytes = data.num_chunks * data.chunk_rows * d_aug * 4
        if cache_bytes > self.max_in_memory_bytes:
            return stream
        cache = list(stream())
        return lambda: iter(cache)


def _check_one_pass(seen: int, num_examples: int) -> None:
    if seen != num_examples:  # one pass, each example once
        raise AssertionError(f"dp_newton pass saw {seen} examples, data has {num_examples}")
