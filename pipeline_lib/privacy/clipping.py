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

import jax
import jax.numpy as jnp

FEATURE_TRANSFORMS = ("clip", "normalize")
SHRINK = 1.0 - 1e-6  # the one clipping margin of the project


def check_bound(name: str, value) -> float:
    """A clipping bound as a Python float, refused unless finite and > 0. Jitted kernels
    take their bounds as traced arguments (one compiled program serves every bound), so
    the bound is checked here, on the host, before it enters them."""
    bound = float(value)
    if not 0 < bound < float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return bound


def _target(bound) -> jnp.ndarray:
    """B' = B * SHRINK as float32. A Python number is multiplied on the host; a traced
    bound (a float32 argument of a jitted kernel) in float32, which can differ from the
    host product by an ulp: B' <= B (1 + 2^-24)^2 SHRINK < B (1 - 9e-7) either way, so the
    bound still holds with room for the rounding of the scaling itself."""
    if isinstance(bound, jax.core.Tracer):
        return jnp.asarray(bound, jnp.float32) * jnp.float32(SHRINK)
    return jnp.float32(bound * SHRINK)


def clip_factors(norms: jnp.ndarray, bound: float) -> jnp.ndarray:
    """min(1, B' / norm) per entry (B' = B * SHRINK): multiplying a vector of norm
    `norms` by it leaves a norm <= B. Zero norms get factor 1."""
    target = _target(bound)
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
    if not isinstance(l2_clip_norm, jax.core.Tracer):  # a traced C: see check_bound
        check_bound("l2_clip_norm", l2_clip_norm)
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
        target = _target(l2_clip_norm)
        scale = jnp.where(norms > 0, target / jnp.where(norms > 0, norms, 1.0), 0.0)
    return x * scale
