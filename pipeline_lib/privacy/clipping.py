"""Clipping: every per-example quantity that enters a release is bounded here.

Every sensitivity statement in this project rests on an L2 bound on one
example's contribution: its feature vector (``bound_rows``: norm <= C), its
logistic-loss gradient (``clip_factors`` on the closed-form norm: <= G), its
DP-Newton residual and Hessian-weight rows (``clip_l2``: <= rho, rho_h).
All of them go through the one margin below and are property-tested.

Floating-point rounding can leave ``x * (B / ||x||)`` a few ulps above B, so
the target norm is shrunk by a relative 1e-6 (``SHRINK``): the bound holds
exactly for the float32 values that enter the statistics, not just "up to
rounding".
"""

from __future__ import annotations

import jax.numpy as jnp

FEATURE_TRANSFORMS = ("clip", "normalize")
SHRINK = 1.0 - 1e-6  # the one clipping margin of the project


def clip_factors(norms: jnp.ndarray, bound: float) -> jnp.ndarray:
    """min(1, B' / norm) per entry (B' = B * SHRINK): multiplying a vector of norm
    `norms` by it leaves a norm <= B. Zero norms get factor 1."""
    target = jnp.float32(bound * SHRINK)
    return jnp.where(norms > target, target / jnp.where(norms > 0, norms, 1.0), 1.0)


def clip_l2(x: jnp.ndarray, bound: float) -> jnp.ndarray:
    """Every row (last axis) of `x` scaled down, if needed, to L2 norm <= bound."""
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x * clip_factors(norms, bound)


def bound_rows(x: jnp.ndarray, l2_clip_norm: float, transform: str = "clip") -> jnp.ndarray:
    """Bound every row of `x` to L2 norm <= l2_clip_norm.

    transform="clip": rows longer than C are scaled down to norm C, shorter
        rows are left as they are.
    transform="normalize": every nonzero row is scaled to norm C (all-zero
        rows stay zero). A public per-example map, so it costs no privacy.
    """
    if not l2_clip_norm > 0:
        raise ValueError(f"l2_clip_norm must be > 0, got {l2_clip_norm!r}")
    if transform not in FEATURE_TRANSFORMS:
        raise ValueError(
            f"feature transform {transform!r} unknown; use one of {FEATURE_TRANSFORMS}"
        )
    x = jnp.asarray(x, jnp.float32)
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    if transform == "clip":
        # A row whose squared norm underflows to 0 has true norm < 1e-19 <= C: keep it.
        scale = clip_factors(norms, l2_clip_norm)
    else:
        target = jnp.float32(l2_clip_norm * SHRINK)
        scale = jnp.where(norms > 0, target / jnp.where(norms > 0, norms, 1.0), 0.0)
    return x * scale
