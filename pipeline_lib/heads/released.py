"""Load a released head (head.npz) and predict with it.

head.npz holds the released weights and bias, for a head with private centring
(``center: true``) the released feature mean ``center`` that every new feature vector
is centred by before prediction (`privacy.centering.center_rows`), the sha256 of its content
(``content_sha256``, checked by `load_head`) and, as JSON under `metadata`, the
run's record (`pipeline_lib.run_contract.RunRecord`, checked on load, as in
metrics.json): method, privacy guarantee (target and spent epsilon, delta,
accountant, neighbouring relation, noise multipliers, dp_event, privacy
statement), the hyperparameters, and the feature bound (l2_clip_norm,
feature_transform) that `predict` must apply to new features, the class names
(label i is ``class_names[i]``) and, under ``features``, how the training
features were made (backbone, checkpoint sha256, image size, preprocessing
including the resize, dtype, batch shape), so that ``python -m
pipeline_lib.classify`` computes features of new images the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np

from pipeline_lib import integrity
from pipeline_lib.heads.linear import predict_logits
from pipeline_lib.privacy.centering import center_rows
from pipeline_lib.run_contract import RunRecord


@dataclasses.dataclass(frozen=True)
class ReleasedHead:
    weights: np.ndarray  # (d, K) float32
    bias: np.ndarray  # (K,) float32
    metadata: RunRecord  # the run's record, as its metrics.json holds it
    center: np.ndarray | None = None  # (d,) released feature mean (private centring), or None

    @property
    def private(self) -> bool:
        return bool(self.metadata.private)

    @property
    def differentially_private(self) -> bool:
        """True only for a DP head whose noise came from a secret key: False for baselines
        and for runs with reproducible noise, which are NOT differentially private."""
        return self.private and self.metadata.differentially_private is True

    @property
    def class_names(self) -> list[str]:
        """Label i's name; the label index as text for heads released without names."""
        names = self.metadata.class_names
        if names and len(names) == self.weights.shape[1]:
            return [str(n) for n in names]
        return [str(i) for i in range(self.weights.shape[1])]

    @property
    def epsilon(self) -> float | None:
        return self.metadata.spent_epsilon

    @property
    def delta(self) -> float | None:
        return self.metadata.spent_delta

    def logits(self, features: np.ndarray) -> np.ndarray:
        hp = self.metadata.hyperparameters
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.weights.shape[0]:
            raise ValueError(
                f"features must have shape (n, {self.weights.shape[0]}), got {features.shape}"
            )
        if self.center is not None:  # the rows the head was trained on (privacy.centering)
            features = center_rows(
                features,
                self.center,
                l2_clip_norm=float(hp["l2_clip_norm"]),
                transform=hp["feature_transform"],
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


# Store attributes that decide how features of new images must be computed.
FEATURE_KEYS = ("backbone", "checkpoint_sha256", "image_size", "preprocessing",
                "compute_dtype", "batch_size", "chunk_rows", "feature_dim", "dataset",
                "source", "tta", "sources", "source_normalization")  # fmt: skip


def feature_provenance(train_store) -> dict:
    """What a released head records about its features (from the training store's attrs):
    ``class_names`` and ``features`` (see the module docstring). Public: the store's
    attributes describe the pipeline, not the private examples."""
    attrs = train_store.attrs
    return {
        "class_names": attrs.get("class_names"),
        "features": {k: attrs[k] for k in FEATURE_KEYS if k in attrs},
    }


def load_head(path: str | os.PathLike, *, repair: str | None = None) -> ReleasedHead:
    """The head at ``path``; its checksum is checked (IntegrityError naming file and fault)."""
    from pipeline_lib.run_outputs import head_members, head_repair_command

    fix = repair or head_repair_command(os.path.join(os.path.dirname(path), "metrics.json"))
    try:
        with np.load(path, allow_pickle=False) as z:
            weights, bias, text = z["weights"], z["bias"], z["metadata"]
            center = z["center"] if "center" in z.files else None
            recorded = str(z["content_sha256"]) if "content_sha256" in z.files else None
    except FileNotFoundError:
        raise integrity.IntegrityError(path, "missing", "the head file is gone", fix) from None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise integrity.unreadable_npz(path, exc, "released head file", fix) from None
    if recorded is None:
        raise integrity.IntegrityError(path, "checksum", "it records no content checksum", fix)
    if integrity.arrays_digest(head_members(weights, bias, str(text), center)) != recorded:
        raise integrity.IntegrityError(
            path, "checksum", "its content does not match its recorded sha256", fix
        )
    metadata = RunRecord.from_json(json.loads(str(text)), f"{path} (metadata)")
    if weights.ndim != 2 or bias.shape != (weights.shape[1],):
        raise ValueError(f"{path}: weights {weights.shape} and bias {bias.shape} do not match")
    centred = bool((metadata["hyperparameters"] or {}).get("center", False))
    if centred != (center is not None):
        raise ValueError(
            f"{path}: hyperparameter center={centred} but the file "
            f"{'lacks' if centred else 'has'} a 'center' array"
        )
    if center is not None and center.shape != (weights.shape[0],):
        raise ValueError(f"{path}: center {center.shape} does not match weights {weights.shape}")
    return ReleasedHead(weights=weights, bias=bias, metadata=metadata, center=center)
