"""Sufficient statistics for least-squares heads, streamed from a feature store.

X^T X (d, d), X^T Y (d, K) with one-hot Y, and per-class counts, for the
bounded features (see `pipeline_lib.privacy.clipping`). They are computed
from private data and are NOT private: they may be cached next to the
features (which are private too) but only noisy versions ever leave a head.
Memory is O(d^2 + dK) whatever N is: the store is read one chunk at a time.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.features.store import FeatureStore
from pipeline_lib.privacy.clipping import bound_rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuffStats:
    xtx: np.ndarray  # (d, d) float64
    xty: np.ndarray  # (d, K) float64
    class_counts: np.ndarray  # (K,) int64
    num_examples: int
    l2_clip_norm: float
    transform: str

    @property
    def feature_dim(self) -> int:
        return self.xtx.shape[0]

    @property
    def num_classes(self) -> int:
        return self.xty.shape[1]


@partial(jax.jit, static_argnames=("num_classes", "l2_clip_norm", "transform"))
def _chunk_stats(x, y, mask, *, num_classes, l2_clip_norm, transform):
    xb = bound_rows(x, l2_clip_norm, transform) * mask[:, None]
    xtx = xb.T @ xb
    xty = jax.ops.segment_sum(xb, y, num_segments=num_classes).T
    counts = jax.ops.segment_sum(mask.astype(jnp.int32), y, num_segments=num_classes)
    return xtx, xty, counts


def pad_rows(x: np.ndarray, y: np.ndarray, rows: int):
    """Pad (x, y) with zero rows up to `rows` and return (x, y, mask): one compiled shape."""
    n = len(y)
    mask = np.zeros(rows, np.float32)
    mask[:n] = 1.0
    if n < rows:
        x = np.concatenate([x, np.zeros((rows - n, x.shape[1]), x.dtype)])
        y = np.concatenate([y, np.zeros(rows - n, y.dtype)])
    return x, y, mask


def padded_chunks(store: FeatureStore):
    """Chunks padded to the store's chunk_rows with a mask, so jit compiles once."""
    for feats, labels in store.iter_chunks():
        yield pad_rows(feats, labels, store.chunk_rows)


def compute_stats(store: FeatureStore, *, l2_clip_norm: float, transform: str) -> SuffStats:
    d, k = store.feature_dim, store.num_classes
    xtx = np.zeros((d, d), np.float64)
    xty = np.zeros((d, k), np.float64)
    counts = np.zeros(k, np.int64)
    for feats, labels, mask in padded_chunks(store):
        a, b, c = _chunk_stats(
            feats,
            labels,
            mask,
            num_classes=k,
            l2_clip_norm=float(l2_clip_norm),
            transform=transform,
        )
        xtx += np.asarray(a, np.float64)
        xty += np.asarray(b, np.float64)
        counts += np.asarray(c, np.int64)
    if int(counts.sum()) != store.num_examples:  # one pass, each example once
        raise AssertionError(f"stats saw {counts.sum()} examples, store has {store.num_examples}")
    return SuffStats(
        xtx=xtx,
        xty=xty,
        class_counts=counts,
        num_examples=store.num_examples,
        l2_clip_norm=float(l2_clip_norm),
        transform=transform,
    )


def save_stats(stats: SuffStats, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        xtx=stats.xtx,
        xty=stats.xty,
        class_counts=stats.class_counts,
        num_examples=stats.num_examples,
        l2_clip_norm=stats.l2_clip_norm,
        transform=stats.transform,
    )
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> SuffStats:
    try:
        with np.load(path) as z:
            return SuffStats(
                xtx=z["xtx"],
                xty=z["xty"],
                class_counts=z["class_counts"],
                num_examples=int(z["num_examples"]),
                l2_clip_norm=float(z["l2_clip_norm"]),
                transform=str(z["transform"]),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid statistics file ({exc})") from exc
