"""Poisson sampling: one independent Bernoulli(q) draw per example per step.

The sampling analysed by ``PoissonSampledDpEvent(q, ...)`` includes each
example independently with probability q, regardless of the data. Row j of
chunk c is in the batch at step t iff u < q' for u ~ U[0, 1) drawn with the
key (base key, release, index=c, step=t) (`noise.KeyStream`), at position j.
q' is q rounded down to the 2^-23 grid of float32 uniforms, so
P(in batch) = q' <= q exactly: the realised rate never exceeds the q in the
DpEvent, and Poisson-subsampled epsilon grows with q, so accounting with q is
conservative. The masks depend on keys only (never on the data), as the
analysis requires; an empty batch is allowed.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from pipeline_lib.privacy.noise import KeyStream

_UNIFORM_GRID = 2.0**-23  # jax.random.uniform (float32) returns multiples of 2^-23 in [0, 1)


def bernoulli_threshold(sampling_prob: float) -> jax.Array:
    """The largest t <= q on the uniform grid: P(u < t) = t <= q exactly.

    The realised sampling probability never exceeds the q in the DpEvent
    (Poisson-subsampled epsilon grows with q, so accounting with q is
    conservative), and it is below q by less than 2^-23.
    """
    return jnp.float32(math.floor(sampling_prob / _UNIFORM_GRID) * _UNIFORM_GRID)


@partial(jax.jit, static_argnames=("chunk_rows",))
def poisson_masks(base, chunk_ids, step, threshold, *, chunk_rows: int):
    """(len(chunk_ids), chunk_rows) bool: row j of chunk c is sampled at this step.

    `threshold` comes from `bernoulli_threshold(q)`.
    """

    def one(c):
        return jax.random.uniform(KeyStream.derive(base, c, step), (chunk_rows,)) < threshold

    return jax.vmap(one)(chunk_ids)
