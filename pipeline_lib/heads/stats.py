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
import threading
import zipfile
from collections import OrderedDict
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib import integrity
from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads.linear import padded_chunks
from pipeline_lib.privacy.clipping import bound_rows, check_bound


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuffStats:
    xtx: np.ndarray  # (d, d) float64
    xty: np.ndarray  # (d, K) float64
    class_counts: np.ndarray  # (K,) int64
    num_examples: int
    l2_clip_norm: float
    transform: str
    source: str = ""  # identity of the data (see data_identity); "" when unknown

    @property
    def feature_dim(self) -> int:
        return self.xtx.shape[0]

    @property
    def num_classes(self) -> int:
        return self.xty.shape[1]


def _chunk_stats(x, y, mask, *, num_classes, l2_clip_norm, transform):
    """One chunk's X^T X, X^T Y and class counts over bounded, masked rows (not released)."""
    c = check_bound("l2_clip_norm", l2_clip_norm)
    return _chunk_stats_jit(
        x, y, mask, num_classes=num_classes, l2_clip_norm=c, transform=transform
    )


@partial(jax.jit, static_argnames=("num_classes", "transform"))  # C is traced: one program
def _chunk_stats_jit(x, y, mask, *, num_classes, l2_clip_norm, transform):
    xb = bound_rows(x, l2_clip_norm, transform) * mask[:, None]
    xtx = xb.T @ xb
    xty = jax.ops.segment_sum(xb, y, num_segments=num_classes).T
    counts = jax.ops.segment_sum(mask.astype(jnp.int32), y, num_segments=num_classes)
    return xtx, xty, counts


def data_identity(data) -> str:
    """Which data statistics were computed from: a store's manifest digest, plus the part.

    "" for data without one (in-memory arrays): then no binding is checked.
    """
    digest = getattr(data, "content_digest", None)
    if digest:
        return str(digest)
    parent, part = getattr(data, "data", None), getattr(data, "part", None)
    if parent is not None and part is not None:
        base = data_identity(parent)
        return f"{base}/{part}:{float(data.fraction)!r}" if base else ""
    return ""


def data_fingerprint(data) -> tuple | None:
    """What a store (or a part of one) is *now*, or None when that cannot be told.

    A store: its manifest digest (the sha256 of every chunk, `data_identity`) plus the
    (path, size, mtime) of every file in its directory (`sweep.store_fingerprint`), so a
    re-extracted, replaced or damaged store gets a new fingerprint. A `RowSubset`: its
    parent's fingerprint plus the part and the validation fraction. In-memory arrays: None.
    """
    digest, path = getattr(data, "content_digest", None), getattr(data, "path", None)
    if digest and path is not None:
        from pipeline_lib.sweep import store_fingerprint  # sweep imports no heads

        return (str(digest), store_fingerprint(path))
    parent, part = getattr(data, "data", None), getattr(data, "part", None)
    if parent is not None and part is not None:
        base = data_fingerprint(parent)
        return None if base is None else (base, str(part), float(data.fraction))
    return None


class StatsMemo:
    """Un-noised statistics of stores, kept across the runs of one (warm) process.

    Like the DP-LS statistics file, an entry is a function of private data and is NEVER
    released: a head adds its own fresh noise to what it gets here, for every run. Entries
    are keyed by `data_fingerprint` (so a changed store is recomputed, never served stale)
    plus the caller's public parameters (clip norm, transform, ...); data without a
    fingerprint is never memoised. Least recently used entries beyond `max_entries` are
    dropped. Thread-safe; two threads may compute the same entry once each.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = int(max_entries)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.computed = 0  # how many times an entry was computed (tests, benchmarks)

    def get(self, data, params: tuple, compute) -> np.ndarray:
        """``compute()`` for this data and ``params``, or the memoised result (read-only)."""
        fingerprint = data_fingerprint(data)
        if fingerprint is None:
            return compute()
        key = (fingerprint, params)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = np.asarray(compute())
        value.setflags(write=False)
        with self._lock:
            self.computed += 1
            if data_fingerprint(data) == fingerprint:  # unchanged while we read it
                self._entries[key] = value
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


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
        source=data_identity(store),
    )


def _members(stats: SuffStats) -> dict:
    return dict(
        xtx=np.asarray(stats.xtx),
        xty=np.asarray(stats.xty),
        class_counts=np.asarray(stats.class_counts),
        num_examples=np.asarray(stats.num_examples),
        l2_clip_norm=np.asarray(stats.l2_clip_norm),
        transform=np.asarray(stats.transform),
        source=np.asarray(stats.source),
    )


def stats_repair_command(path: str | os.PathLike) -> str:
    """Delete the cache file; the workflow recomputes it (and refits the heads that use it)."""
    return f"rm -f {os.fspath(path)} && snakemake --cores all"


def save_stats(stats: SuffStats, path: str | os.PathLike) -> None:
    """Write ``stats`` with the sha256 of its content, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    members = _members(stats)
    np.savez(tmp, content_sha256=np.asarray(integrity.arrays_digest(members)), **members)
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike, *, data=None) -> SuffStats:
    """The statistics cached at ``path``, their checksum checked.

    With ``data`` (the store or part they are used with), also checks that they
    were computed from exactly that data. Raises IntegrityError naming the file,
    the fault and the repair command.
    """
    fix = stats_repair_command(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            members = {k: z[k] for k in z.files if k != "content_sha256"}
            recorded = str(z["content_sha256"]) if "content_sha256" in z.files else None
    except FileNotFoundError:
        raise integrity.IntegrityError(
            path, "missing", "the statistics file is gone", fix
        ) from None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise integrity.unreadable_npz(path, exc, "statistics file", fix) from None
    if recorded is None:
        raise integrity.IntegrityError(path, "checksum", "it records no content checksum", fix)
    if integrity.arrays_digest(members) != recorded:
        raise integrity.IntegrityError(
            path, "checksum", "its content does not match its recorded sha256", fix
        )
    try:
        stats = SuffStats(
            xtx=members["xtx"],
            xty=members["xty"],
            class_counts=members["class_counts"],
            num_examples=int(members["num_examples"]),
            l2_clip_norm=float(members["l2_clip_norm"]),
            transform=str(members["transform"]),
            source=str(members["source"]),
        )
    except KeyError as exc:
        raise integrity.IntegrityError(path, "unreadable", f"no member {exc}", fix) from None
    want = data_identity(data) if data is not None else ""
    if want and stats.source != want:
        raise integrity.IntegrityError(
            path,
            "mismatch",
            f"it was computed from other data (source {stats.source[:16] or 'unknown'}..., "
            f"expected {want[:16]}...), e.g. copied from another run",
            fix,
        )
    return stats
