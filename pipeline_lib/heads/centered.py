"""Any private head with private feature centring (``center: true`` in its config).

`Centered` wraps a private head. Its release is the noisy feature mean mu~
(`privacy.centering`: sensitivity C, Gaussian noise from the key's child
"center", divided by the public N) followed by the wrapped head trained on the
rows ``bound_rows(bound_rows(x) - mu~)``; its event is
the composition of Gaussian(s_m) and the head (`events.centered_event`). The wrapped head's own
sensitivity analysis is unchanged (why: `privacy.centering`).

Hyperparameters (public, in the config and the schema):

* ``center`` (bool, default false): centre privately. Without it the head is the
  plain head, byte for byte (same events, same noise draws).
* ``center_share`` (default 0.02, `privacy.centering.DEFAULT_SHARE`): the share of
  the Gaussian-DP budget the mean release gets, s_m = z(epsilon, delta) / sqrt(share).

Statistics heads (DP-LS) cannot use the cached uncentred X^T X: `fit` streams
the data once more to compute the centred statistics for this run only; nothing
derived from mu~ is cached. ``fit`` returns ``center`` (mu~) with the weights:
the runner evaluates on centred test rows, and head.npz stores it, so that
`heads.released` centres new features the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dp_accounting
import numpy as np

from pipeline_lib.features.centered import CenteredRows
from pipeline_lib.heads.stats import compute_stats
from pipeline_lib.privacy import centering, events, noise

__all__ = ["CENTER_KEYS", "Centered", "wrap_centered"]

CENTER_KEYS = ("center", "center_share")
_STATS_HEADS = ("dp_ls",)  # private heads fitted from sufficient statistics


@dataclasses.dataclass(frozen=True, kw_only=True)
class Centered:
    head: Any  # the wrapped private head (calibrated once `calibrate` has run)
    center_share: float = centering.DEFAULT_SHARE
    center_noise_multiplier: float | None = None  # s_m, set by calibrate
    noise_factor: float | None = None  # t, the head's noise over its alone calibration

    private = True
    center = True  # experiments.py: a centred statistics head reads no cached statistics

    def __post_init__(self):
        centering.check_share(self.center_share)
        if not getattr(self.head, "private", False):
            raise ValueError(f"center: true is only for private heads, not {self.head.name!r}")

    def __getattr__(self, name: str):
        # Everything not defined here (accountant, l2_clip_norm, feature_transform,
        # sampling_prob, num_examples, ...) is the wrapped head's.
        if name == "head" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.head, name)

    @property
    def name(self) -> str:
        return self.head.name

    @property
    def noise_multiplier(self) -> float | None:
        return self.head.noise_multiplier

    def hyperparameters(self) -> dict:
        return {**self.head.hyperparameters(), "center": True, "center_share": self.center_share}

    def noise_multipliers(self) -> dict[str, float]:
        if self.center_noise_multiplier is None:
            raise ValueError(f"{self.name}: not calibrated; call .calibrate() first")
        return {**self.head.noise_multipliers(), "center": self.center_noise_multiplier}

    def dp_event(self) -> dp_accounting.DpEvent:
        if self.center_noise_multiplier is None:
            raise ValueError(f"{self.name}: not calibrated; call .calibrate() first")
        return events.centered_event(self.center_noise_multiplier, self.head.dp_event())

    def calibrate(self, *, epsilon: float, delta: float, num_examples: int | None = None):
        cal = centering.calibrate_centered(
            self.head,
            epsilon=epsilon,
            delta=delta,
            num_examples=num_examples,
            share=self.center_share,
        )
        return dataclasses.replace(
            self,
            head=cal.head,
            center_noise_multiplier=cal.center_noise_multiplier,
            noise_factor=cal.factor,
        )

    def with_head_noise(self, noise_multiplier: float) -> Centered:
        """The same mean release, the head's noise multiplier replaced (tuning's factor t)."""
        head = dataclasses.replace(self.head, noise_multiplier=float(noise_multiplier))
        return dataclasses.replace(self, head=head, noise_factor=None)

    def center_record(self, center: np.ndarray) -> dict:
        """What metrics.json says about the centring (mu~ is released, so it is written)."""
        return {
            "release": centering.CENTER_RELEASE,
            "share": self.center_share,
            "noise_multiplier": self.center_noise_multiplier,
            "sensitivity": float(self.head.l2_clip_norm),
            "noise_stddev_of_sum": self.center_noise_multiplier * float(self.head.l2_clip_norm),
            "head_noise_factor": self.noise_factor,
            "mean": [float(v) for v in np.asarray(center, np.float32)],
        }

    def fit(self, data, *, key: noise.NoiseKey) -> dict[str, np.ndarray]:
        """Release mu~ from `data`, then fit the wrapped head on the centred rows."""
        if self.center_noise_multiplier is None:
            raise ValueError(f"{self.name}: not calibrated; call .calibrate() first")
        c, transform = float(self.head.l2_clip_norm), self.head.feature_transform
        center = centering.release_mean(
            data,
            l2_clip_norm=c,
            transform=transform,
            noise_multiplier=self.center_noise_multiplier,
            key=key,
        )
        rows = CenteredRows(data, center, l2_clip_norm=c, transform=transform)
        if self.head.name in _STATS_HEADS:
            fitted = self.head.fit(
                compute_stats(rows, l2_clip_norm=c, transform=transform), key=key
            )
        else:
            fitted = self.head.fit(rows, key=key)
        return {**fitted, "center": center}


def wrap_centered(head, params: dict):
    """`head` wrapped in `Centered` when ``params`` asks for it; `head` itself otherwise."""
    center, share = params.get("center", False), params.get("center_share")
    if not isinstance(center, bool):
        raise ValueError(f"center must be true or false, got {center!r}")
    if not center:
        if share is not None:
            raise ValueError(f"center_share={share!r} needs center: true")
        return head
    return Centered(head=head, center_share=centering.DEFAULT_SHARE if share is None else share)
