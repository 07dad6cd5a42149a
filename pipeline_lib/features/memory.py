"""An in-memory stand-in for `FeatureStore`, with the same read interface.

For tests, audits and small experiments: heads take anything with this
interface, so the same `fit` code runs on a Zarr store or on arrays.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline_lib.features.store import chunk_bounds, num_chunks


class ChunkedRows:
    """The chunk bookkeeping of the store read interface, given ``num_examples``,
    ``chunk_rows`` and ``read_chunk``: chunks are consecutive, all full but the last."""

    num_examples: int
    chunk_rows: int

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.num_examples, self.chunk_rows)

    def chunk_sizes(self) -> list[int]:
        return [b - a for a, b in (self._bounds(c) for c in range(self.num_chunks))]

    def _bounds(self, chunk: int) -> tuple[int, int]:
        return chunk_bounds(chunk, self.num_examples, self.chunk_rows)

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for c in range(self.num_chunks):
            yield self.read_chunk(c)


class InMemoryFeatures(ChunkedRows):
    def __init__(self, features, labels, *, num_classes: int, chunk_rows: int = 1024):
        features = np.asarray(features, np.float32)
        labels = np.asarray(labels, np.int32)
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
        if not np.all(np.isfinite(features)):
            raise ValueError("features contain NaN or Inf")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels out of range [0, {num_classes})")
        if chunk_rows <= 0:
            raise ValueError("chunk_rows must be > 0")
        self.features, self.labels = features, labels
        self.num_examples, self.feature_dim = features.shape
        self.num_classes = int(num_classes)
        self.chunk_rows = int(chunk_rows)

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self._bounds(chunk)
        return self.features[a:b], self.labels[a:b]

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        return self.features, self.labels
