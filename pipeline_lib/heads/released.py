"""Load a released head (head.npz) and predict with it.

head.npz holds the released weights and bias and, as JSON under `metadata`,
everything in the run's metrics.json: method, privacy guarantee (target and
spent epsilon, delta, accountant, neighbouring relation, noise multipliers,
dp_event, privacy statement), the hyperparameters, and the feature bound
(l2_clip_norm, feature_transform) that `predict` must apply to new features.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from pipeline_lib.heads.linear import predict_logits


@dataclasses.dataclass(frozen=True)
class ReleasedHead:
    weights: np.ndarray  # (d, K) float32
    bias: np.ndarray  # (K,) float32
    metadata: dict

    @property
    def private(self) -> bool:
        return bool(self.metadata["private"])

    @property
    def differentially_private(self) -> bool:
        """True only for a DP head whose noise came from a secret key: False for baselines
        and for runs with reproducible noise, which are NOT differentially private."""
        return self.private and self.metadata.get("differentially_private") is True

    @property
    def epsilon(self) -> float | None:
        return self.metadata.get("spent_epsilon")

    @property
    def delta(self) -> float | None:
        return self.metadata.get("spent_delta")

    def logits(self, features: np.ndarray) -> np.ndarray:
        hp = self.metadata["hyperparameters"]
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.weights.shape[0]:
            raise ValueError(
                f"features must have shape (n, {self.weights.shape[0]}), got {features.shape}"
            )
        return np.asarray(
            predict_logits(
                self.weights,
                self.bias,
                features,
                l2_clip_norm=float(hp["l2_clip_norm"]),
                transform=hp["feature_transform"],
            )
        )

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted class per row of `features` (backbone pre-logits, as in the store)."""
        return np.argmax(self.logits(features), axis=-1)


def load_head(path: str | os.PathLike) -> ReleasedHead:
    try:
        with np.load(path, allow_pickle=False) as z:
            weights, bias = z["weights"], z["bias"]
            metadata = json.loads(str(z["metadata"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a released head file ({exc})") from exc
    if weights.ndim != 2 or bias.shape != (weights.shape[1],):
        raise ValueError(f"{path}: weights {weights.shape} and bias {bias.shape} do not match")
    for key in ("private", "hyperparameters", "method"):
        if key not in metadata:
            raise ValueError(f"{path}: metadata lacks {key!r}")
    return ReleasedHead(weights=weights, bias=bias, metadata=metadata)
