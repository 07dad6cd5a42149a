"""A read-only view of a feature store whose rows are centred by a released mean.

Rows come out as ``bound_rows(x, C, transform) - center`` (`privacy.centering.center_rows`),
so a head that applies its usual ``bound_rows`` to them trains, validates and tests on
exactly the rows the private centring defines. Nothing is cached: the view maps each
chunk as it is read, and nothing derived from ``center`` outlives the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline_lib.features.memory import ChunkedRows
from pipeline_lib.privacy.centering import center_rows


class CenteredRows(ChunkedRows):
    """``source`` (FeatureStore, InMemoryFeatures, RowSubset, ...) with centred rows."""

    def __init__(self, source, center: np.ndarray, *, l2_clip_norm: float, transform: str):
        center = np.asarray(center, np.float32)
        if center.shape != (int(source.feature_dim),):
            raise ValueError(
                f"feature center has shape {center.shape}, the features have dimension "
                f"{source.feature_dim}"
            )
        self.source, self.center = source, center
        self.l2_clip_norm, self.transform = float(l2_clip_norm), transform
        self.num_examples = int(source.num_examples)
        self.feature_dim, self.num_classes = int(source.feature_dim), int(source.num_classes)
        self.chunk_rows = int(source.chunk_rows)
        self.attrs = dict(getattr(source, "attrs", {}) or {})

    def _map(self, feats) -> np.ndarray:
        return center_rows(
            feats, self.center, l2_clip_norm=self.l2_clip_norm, transform=self.transform
        )

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = self.source.read_chunk(chunk)
        return self._map(feats), labels

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for feats, labels in self.source.iter_chunks():
            yield self._map(feats), labels

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_chunks())
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
