"""Shared pieces of the logistic-loss DP heads (DP-SGD and DP-FC).

The model is multinomial (softmax) logistic regression on a linear head,
logits = x W + a b~, with weights W (d, K) and a bias b = a b~ (K,); ``a`` is
a public constant (``bias_scale``, 1 for DP-SGD) that makes the bias the
weight of a constant feature ``a`` appended to every example.

Per-example gradients in closed form
------------------------------------
For softmax cross-entropy with one-hot label y_i and probabilities p_i, the
gradient of example i is x_i r_i^T with respect to W and a r_i with respect
to b~, where r_i = p_i - y_i. Its squared norm (W and b~ together) is

    ||g_i||^2 = (||x_i||^2 + a^2) ||r_i||^2,

and the sum of the clipped gradients, with c_i = min(1, G / ||g_i||), is
X^T (c * R) for W and a sum_i c_i r_i for b~. Nothing of size N x d x K is
ever formed. Each clipped gradient has norm <= G (G = ``l2_grad_clip``, shrunk
by a relative 1e-6 so that float rounding cannot push it above G), so adding
or removing one example changes the clipped sum by at most G in L2 norm
(W and b~ entries together): that is the sensitivity of every gradient release.

Data access
-----------
`BoundedRows` bounds every feature row to norm <= C (`bound_rows`, the same
transform the runner applies to test features) and either caches the bounded
features in memory, when N * d * 4 bytes <= ``max_in_memory_bytes``, or
streams the store chunk by chunk on every pass (memory O(chunk d + d K)).

Poisson sampling is the kernel's (`pipeline_lib.privacy.sampling`): one
independent Bernoulli(q' <= q) draw per example per step from the key
(key, release, chunk, step); the cached and streamed paths select exactly the
same rows. An empty batch is allowed: its gradient sum is zero and the noise
is still added.

Noise keys
----------
Gradient noise for class k at step t is drawn with the kernel's
`noise.KeyStream` key (key, release, k, t) (`noise.per_class_normal`): never
shared across classes or steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.heads.base import (
    ACCOUNTANT,
    FEATURE_BOUND,
    NOISE_MULTIPLIER,
    NONNEGATIVE,
    POSITIVE,
)
from pipeline_lib.heads.linear import pad_rows
from pipeline_lib.privacy.clipping import bound_rows, check_bound, clip_factors
from pipeline_lib.privacy.noise import KeyStream
from pipeline_lib.privacy.sampling import bernoulli_threshold, poisson_masks

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------- gradients


def per_example_grad_sq_norms(weights, bias, xb, labels, *, bias_scale=1.0):
    """||g_i||^2 = (||x_i||^2 + a^2) ||p_i - y_i||^2 for every row (closed form)."""
    r = _residuals(weights, bias, xb, labels)
    return (jnp.sum(xb * xb, axis=1) + bias_scale**2) * jnp.sum(r * r, axis=1)


def _residuals(weights, bias, xb, labels):
    logits = xb @ weights + bias
    onehot = jax.nn.one_hot(labels, weights.shape[1], dtype=logits.dtype)
    return jax.nn.softmax(logits, axis=-1) - onehot


def clipped_grad_sum(weights, bias_param, xb, labels, mask, *, l2_grad_clip, bias_scale=1.0):
    """Sum over masked rows of the per-example gradients, each clipped to norm <= G.

    Returns (grad_weights (d, K), grad_bias_param (K,)). The bias used in the
    logits is bias_scale * bias_param; its gradient is bias_scale * r_i.
    """
    r = _residuals(weights, bias_scale * bias_param, xb, labels)
    sq = (jnp.sum(xb * xb, axis=1) + bias_scale**2) * jnp.sum(r * r, axis=1)
    factor = clip_factors(jnp.sqrt(sq), l2_grad_clip)  # kernel: ||g_i|| <= G
    cr = (factor * mask)[:, None] * r
    return xb.T @ cr, bias_scale * jnp.sum(cr, axis=0)


# The bounds are traced arguments (one compiled program for every G and bias scale); the
# callers pass the head's validated hyperparameters.
_clipped_grad_sum_jit = jax.jit(clipped_grad_sum)


# --------------------------------------------------------------------------- data access


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@partial(jax.jit, static_argnames=("transform",))  # C is traced
def _bound(x, *, l2_clip_norm, transform):
    return bound_rows(x, l2_clip_norm, transform)


class BoundedRows:
    """Training rows with features bounded to norm <= C, cached or streamed.

    `data` is a `FeatureStore` or `InMemoryFeatures` (the shared read
    interface). The bounded features are cached (float32, padded to whole
    chunks, with a validity mask) only when N * d * 4 <= max_in_memory_bytes;
    otherwise every pass re-reads the store chunk by chunk.
    """

    def __init__(self, data, *, l2_clip_norm: float, transform: str, max_in_memory_bytes: float):
        self.data = data
        self.l2_clip_norm = check_bound("l2_clip_norm", l2_clip_norm)
        self.transform = transform
        self.num_examples = int(data.num_examples)
        self.feature_dim, self.num_classes = int(data.feature_dim), int(data.num_classes)
        self.chunk_rows, self.num_chunks = int(data.chunk_rows), int(data.num_chunks)
        self.cached = self.num_examples * self.feature_dim * 4 <= max_in_memory_bytes
        if self.cached:
            padded = max(self.num_chunks, 1) * self.chunk_rows
            x = np.zeros((padded, self.feature_dim), np.float32)
            y = np.zeros(padded, np.int32)
            seen = 0
            for feats, labels in data.iter_chunks():
                x[seen : seen + len(labels)] = np.asarray(self._bound_chunk(feats))
                y[seen : seen + len(labels)] = labels
                seen += len(labels)
            if seen != self.num_examples:  # one pass, each example once
                raise AssertionError(f"read {seen} rows, store has {self.num_examples}")
            mask = np.zeros(padded, np.float32)
            mask[:seen] = 1.0
            self._x, self._y, self._mask = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)

    def _bound_chunk(self, feats) -> jax.Array:
        return _bound(
            jnp.asarray(feats, jnp.float32),
            l2_clip_norm=self.l2_clip_norm,
            transform=self.transform,
        )

    def iter_blocks(self) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """One pass over all rows: (bounded x (R, d), labels (R,), mask (R,)), R fixed."""
        if self.cached:
            yield self._x, self._y, self._mask
            return
        seen = 0
        for feats, labels in self.data.iter_chunks():
            seen += len(labels)
            yield _padded(self._bound_chunk(feats), labels, self.chunk_rows)
        if seen != self.num_examples:
            raise AssertionError(f"read {seen} rows, store has {self.num_examples}")

    def _chunk_mask(self, stream: KeyStream, step: int, q: float, chunk: int) -> np.ndarray:
        ids = jnp.array([chunk])
        return np.asarray(poisson_masks(stream.base, ids, step, q, chunk_rows=self.chunk_rows))[0]

    def poisson_indices(self, stream: KeyStream, step: int, sampling_prob: float) -> np.ndarray:
        """Global row indices sampled at `step`: one independent Bernoulli(q) per row."""
        q = bernoulli_threshold(sampling_prob)
        if self.num_chunks == 0:
            return np.zeros(0, np.int64)
        if self.cached:
            ids = jnp.arange(self.num_chunks)
            masks = poisson_masks(stream.base, ids, step, q, chunk_rows=self.chunk_rows)
            return np.flatnonzero(np.asarray(masks).reshape(-1)[: self.num_examples])
        parts = []
        for c, n in enumerate(self.data.chunk_sizes()):
            sel = np.flatnonzero(self._chunk_mask(stream, step, q, c)[:n])
            parts.append(c * self.chunk_rows + sel)
        return np.concatenate(parts)

    def sampled_grad_sum(
        self,
        params,
        stream: KeyStream,
        step: int,
        sampling_prob: float,
        *,
        sub_rows: int,
        l2_grad_clip: float,
        bias_scale: float = 1.0,
    ):
        """Clipped gradient sum over this step's Poisson batch (ragged, possibly empty).

        Cached: the sampled indices are gathered inside jit in fixed-size
        pieces. Streamed: one pass over the store, keeping the sampled rows
        of each chunk; the batch (expected size q N, a public hyperparameter)
        is the only thing held in memory.
        """
        kw = dict(
            l2_grad_clip=check_bound("l2_grad_clip", l2_grad_clip), bias_scale=float(bias_scale)
        )
        gw = jnp.zeros_like(params["weights"])
        gb = jnp.zeros_like(params["bias"])
        if self.cached:
            idx = self.poisson_indices(stream, step, sampling_prob)
            for start in range(0, len(idx), sub_rows):
                piece = idx[start : start + sub_rows]
                take = np.zeros(sub_rows, np.int32)
                take[: len(piece)] = piece
                valid = np.zeros(sub_rows, np.float32)
                valid[: len(piece)] = 1.0
                dw, db = _gathered_grad_sum(
                    params["weights"], params["bias"], self._x, self._y, take, valid, **kw
                )
                gw, gb = gw + dw, gb + db
            return gw, gb
        q = bernoulli_threshold(sampling_prob)
        xs, ys = [], []
        for c, (feats, labels) in enumerate(self.data.iter_chunks()):
            sel = np.flatnonzero(self._chunk_mask(stream, step, q, c)[: len(labels)])
            if sel.size:  # keep the raw sampled rows; bound_rows is row-wise, bound them below
                xs.append(np.asarray(feats, np.float32)[sel])
                ys.append(np.asarray(labels, np.int32)[sel])
        x = np.concatenate(xs) if xs else np.zeros((0, self.feature_dim), np.float32)
        y = np.concatenate(ys) if ys else np.zeros(0, np.int32)
        for start in range(0, len(y), sub_rows):
            xb, yb, mb = _padded(x[start : start + sub_rows], y[start : start + sub_rows], sub_rows)
            # padding rows are zero and masked out; bounding a zero row keeps it zero
            xb = self._bound_chunk(xb) * mb[:, None]
            dw, db = _clipped_grad_sum_jit(params["weights"], params["bias"], xb, yb, mb, **kw)
            gw, gb = gw + dw, gb + db
        return gw, gb


@jax.jit
def _gathered_grad_sum(weights, bias, x, y, take, valid, *, l2_grad_clip, bias_scale):
    return clipped_grad_sum(
        weights, bias, x[take], y[take], valid, l2_grad_clip=l2_grad_clip, bias_scale=bias_scale
    )


def _padded(x, y, rows: int):
    """`pad_rows` (float32 features, int32 labels) as device arrays: one jit shape."""
    x, y, mask = pad_rows(np.asarray(x, np.float32), np.asarray(y, np.int32), rows)
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)


def sub_batch_rows(expected_batch: float) -> int:
    """A fixed jit shape that holds a Poisson batch of this mean in one piece w.h.p."""
    return _round_up(int(expected_batch + 6 * math.sqrt(expected_batch) + 16), 64)


def full_grad_sum(params, rows: BoundedRows, *, l2_grad_clip: float, bias_scale: float = 1.0):
    """Clipped gradient sum over every training row: one pass over the data."""
    kw = dict(l2_grad_clip=check_bound("l2_grad_clip", l2_grad_clip), bias_scale=float(bias_scale))
    gw = jnp.zeros_like(params["weights"])
    gb = jnp.zeros_like(params["bias"])
    for xb, yb, mb in rows.iter_blocks():
        if xb.shape[0] > rows.chunk_rows:  # the in-memory cache, in whole chunks
            dw, db = _scanned_grad_sum(
                params["weights"], params["bias"], xb, yb, mb, chunk_rows=rows.chunk_rows, **kw
            )
        else:
            dw, db = _clipped_grad_sum_jit(params["weights"], params["bias"], xb, yb, mb, **kw)
        gw, gb = gw + dw, gb + db
    return gw, gb


@partial(jax.jit, static_argnames=("chunk_rows",))
def _scanned_grad_sum(weights, bias, x, y, mask, *, chunk_rows, l2_grad_clip, bias_scale):
    """Chunk by chunk, so each chunk is read for the logits and the gradient while cached."""
    shape = (-1, chunk_rows)

    def body(acc, chunk):
        dw, db = clipped_grad_sum(
            weights, bias, *chunk, l2_grad_clip=l2_grad_clip, bias_scale=bias_scale
        )
        return (acc[0] + dw, acc[1] + db), None

    chunks = (x.reshape(*shape, x.shape[1]), y.reshape(shape), mask.reshape(shape))
    init = (jnp.zeros_like(weights), jnp.zeros_like(bias))
    return jax.lax.scan(body, init, chunks)[0]


# --------------------------------------------------------------------------- calibration guesses


def gdp_mu(sampling_prob: float, num_steps: int, noise_multiplier: float) -> float:
    """Gaussian-DP mu of T (Poisson-subsampled) Gaussian steps, by the CLT of Dong et al.

    mu = q sqrt(T (exp(1/s^2) - 1)) for q < 1, and exactly sqrt(T) / s for q = 1.
    An approximation, used ONLY to seed the calibration search: the
    configured dp_accounting accountant decides the noise and the epsilon.
    """
    if sampling_prob >= 1.0:
        return math.sqrt(num_steps) / noise_multiplier
    inv_sq = noise_multiplier**-2.0
    if inv_sq > 700:  # exp overflows: effectively no privacy
        return math.inf
    return sampling_prob * math.sqrt(num_steps * math.expm1(inv_sq))


def solve_scale(mu_of_scale, target_mu: float) -> float:
    """The scale t with mu_of_scale(t) = target_mu (mu decreasing in t), by bisection."""
    lo, hi = 1e-3, 1e6
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if mu_of_scale(mid) > target_mu:
            lo = mid
        else:
            hi = mid
    return hi


# --------------------------------------------------------------------------- validation


# The fields both Poisson-sampled logistic heads (dp_sgd, dp_fc) share.
COMMON_FIELD_RULES = {
    **FEATURE_BOUND,
    "l2_grad_clip": POSITIVE,
    "learning_rate": POSITIVE,
    "max_in_memory_bytes": NONNEGATIVE,
    **ACCOUNTANT,
    **NOISE_MULTIPLIER,
}
