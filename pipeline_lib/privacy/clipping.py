"""Per-example feature transforms that bound each example's L2 norm.

Every private statistic in this project is built from feature vectors whose
L2 norm is at most ``l2_clip_norm`` (C). That bound is what the sensitivity
statements rest on, so it is enforced here and property-tested.

Floating-point rounding can leave ``x * (C / ||x||)`` a few ulps above C, so
the target norm is shrunk by a relative 1e-6: the bound ``||x|| <= C`` holds
exactly for the float32 vectors that enter the statistics, not just "up to
rounding".
"""

from __future__ import annotations

import jax.numpy as jnp

FEATURE_TRANSFORMS = ("clip", "normalize")
_SHRINK = 1.0 - 1e-6


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
    target = jnp.float32(l2_clip_norm * _SHRINK)
    safe = jnp.where(norms > 0, norms, 1.0)
    if transform == "clip":
        # A row whose squared norm underflows to 0 has true norm < 1e-19 <= C: keep it.
        scale = jnp.where(norms > 0, jnp.minimum(1.0, target / safe), 1.0)
    else:
        scale = jnp.where(norms > 0, target / safe, 0.0)
    return x * scale
