"""Load a released head (head.npz) and predict with it.

head.npz holds the released weights and bias, the sha256 of its content
(``content_sha256``, checked by `load_head`) and, as JSON under `metadata`,
everything in the run's metrics.json: method, privacy guarantee (target and
spent epsilon, delta, accountant, neighbouring relation, noise multipliers,
dp_event, privacy statement), the hyperparameters, and the feature bound
(l2_clip_norm, feature_transform) that `predict` must apply to new features.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np

from pipeline_lib import integrity
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


def load_head(path: str | os.PathLike, *, repair: str | None = None) -> ReleasedHead:
    """The head at ``path``; its checksum is checked (IntegrityError naming file and fault)."""
    from pipeline_lib.run_outputs import head_members, head_repair_command

    fix = repair or head_repair_command(os.path.join(os.path.dirname(path), "metrics.json"))
    try:
        with np.load(path, allow_pickle=False) as z:
            weights, bias, text = z["weights"], z["bias"], z["metadata"]
            recorded = str(z["content_sha256"]) if "content_sha256" in z.files else None
    except FileNotFoundError:
        raise integrity.IntegrityError(path, "missing", "the head file is gone", fix) from None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise integrity.unreadable_npz(path, exc, "released head file", fix) from None
    if recorded is None:
        raise integrity.IntegrityError(path, "checksum", "it records no content checksum", fix)
    if integrity.arrays_digest(head_members(weights, bias, str(text))) != recorded:
        raise integrity.IntegrityError(
            path, "checksum", "its content does not match its recorded sha256", fix
        )
    metadata = json.loads(str(text))
    if weights.ndim != 2 or bias.shape != (weights.shape[1],):
        raise ValueError(f"{path}: weights {weights.shape} and bias {bias.shape} do not match")
    for key in ("private", "hyperparameters", "method"):
        if key not in metadata:
            raise ValueError(f"{path}: metadata lacks {key!r}")
    return ReleasedHead(weights=weights, bias=bias, metadata=metadata)
