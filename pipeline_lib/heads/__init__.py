"""Linear heads on frozen features, by name."""

from __future__ import annotations

import dataclasses

from pipeline_lib.heads.centered import CENTER_KEYS, wrap_centered
from pipeline_lib.heads.dp_fc import DPFeatureCovariance
from pipeline_lib.heads.dp_ls import DPLeastSquares
from pipeline_lib.heads.dp_newton import DPNewton
from pipeline_lib.heads.dp_sgd import DPSGDLogistic
from pipeline_lib.heads.nonprivate import NonPrivateLogistic, NonPrivateRidge

HEADS = {
    cls.name: cls
    for cls in (
        DPLeastSquares,
        DPNewton,
        DPFeatureCovariance,
        DPSGDLogistic,
        NonPrivateRidge,
        NonPrivateLogistic,
    )
}
# Heads fitted from cached sufficient statistics (X^T X, X^T Y); the others stream the store.
STATS_HEADS = ("dp_ls", "nonprivate_ridge")


def make_head(method: str, hyperparameters: dict | None = None, *, where: str = "head"):
    """Build a head config; unknown methods or keys are errors naming what is allowed.

    A private head with ``center: true`` comes wrapped in `heads.centered.Centered`
    (private feature centring); without it, the plain head.
    """
    if method not in HEADS:
        raise ValueError(f"{where}: unknown method {method!r}; known methods: {sorted(HEADS)}")
    cls = HEADS[method]
    # Fields set by calibrate() (noise multipliers, N) are never taken from the config.
    calibrated = getattr(cls, "CALIBRATION_FIELDS", ("noise_multiplier",))
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in calibrated]
    if cls.private:
        allowed += list(CENTER_KEYS)
    params = dict(hyperparameters or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown hyperparameter(s) {unknown} for method {method!r}; "
            f"allowed: {allowed}"
        )
    center = {k: params.pop(k) for k in CENTER_KEYS if k in params}
    try:
        return wrap_centered(cls(**params), center)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
