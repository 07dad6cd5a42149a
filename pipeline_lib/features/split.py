"""A validation part held out from a training store, decided per example.

Hyperparameter selection on private data needs a validation set carved out of
the training split. Which rows go where must not depend on the other rows:
under the add-or-remove-one relation, adding or removing one example must not
move any *other* example between the parts (a split by position would: every
later row shifts). So membership is a keyed hash of the example's own feature
vector (features are a deterministic function of its image): an example is in
the validation part iff ``hash(row) < fraction * 2**64``.

:class:`RowSubset` presents one part as a store with the usual read interface
(``num_examples``, ``chunk_rows``, ``read_chunk``, ``iter_chunks``, ...), its
rows compacted into full chunks, so every head and the statistics code run on
it unchanged and still stream (memory O(chunk), plus one index per row).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline_lib.features.memory import ChunkedRows

__all__ = ["PARTS", "RowSubset", "holdout_mask", "validation_mask"]

PARTS = ("fit", "validation")
_HASH_KEY = b"dp-features/validation-holdout/v1"


def holdout_mask(features: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean (n,): True for rows in the validation part.

    A pure function of each row's float32 bytes, so it is the same in every
    process and for every chunking of the store.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    rows = np.ascontiguousarray(features, dtype=np.float32)
    threshold = int(fraction * 2.0**64)
    out = np.empty(len(rows), bool)
    for i, row in enumerate(rows):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=_HASH_KEY).digest()
        out[i] = int.from_bytes(digest, "little") < threshold
    return out


def validation_mask(data, fraction: float) -> np.ndarray:
    """Boolean (N,) over a whole store: True for rows of the validation part (one pass)."""
    masks = [holdout_mask(feats, fraction) for feats, _ in data.iter_chunks()]
    return np.concatenate(masks) if masks else np.zeros(0, bool)


class RowSubset(ChunkedRows):
    """The ``part`` ("fit" or "validation") of ``data`` for a validation ``fraction``.

    ``data`` is a ``FeatureStore`` or anything with the same read interface.
    Construction reads the store once to find the members; reads then touch
    only the source chunks that hold the requested rows.
    """

    def __init__(self, data, *, part: str, fraction: float, _mask: np.ndarray | None = None):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.data, self.part, self.fraction = data, part, float(fraction)
        self.feature_dim, self.num_classes = int(data.feature_dim), int(data.num_classes)
        self.chunk_rows = int(data.chunk_rows)
        in_validation = validation_mask(data, self.fraction) if _mask is None else _mask
        self.rows = np.flatnonzero(in_validation if part == "validation" else ~in_validation)
        self.num_examples = int(len(self.rows))
        if self.num_examples == 0:
            raise ValueError(
                f"the {part} part (validation fraction {fraction}) of a store with "
                f"{len(in_validation)} rows is empty; use a larger store or another fraction"
            )
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @classmethod
    def split(cls, data, *, fraction: float) -> tuple[RowSubset, RowSubset]:
        """(fit part, validation part), hashing the store's rows once for both."""
        mask = validation_mask(data, float(fraction))
        return (
            cls(data, part="fit", fraction=fraction, _mask=mask),
            cls(data, part="validation", fraction=fraction, _mask=mask),
        )

    def _source_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != c:
            feats, labels = self.data.read_chunk(c)
            self._cache = (c, np.asarray(feats), np.asarray(labels))
        return self._cache[1], self._cache[2]

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self._bounds(chunk)
        rows = self.rows[a:b]
        src = rows // self.data.chunk_rows
        feats = np.empty((len(rows), self.feature_dim), np.float32)
        labels = np.empty(len(rows), np.int32)
        for c in np.unique(src):
            sel = src == c
            f, y = self._source_chunk(int(c))
            local = rows[sel] - int(c) * self.data.chunk_rows
            feats[sel], labels[sel] = f[local], y[local]
        return feats, labels

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_chunks())
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
