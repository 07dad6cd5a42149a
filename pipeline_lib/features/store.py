"""The feature store: one Zarr v3 group per (dataset, backbone, split).

Layout of a finished store at ``PATH`` (for example ``.../train.zarr``)::

    features  float32 (N, d), chunked along N only
    labels    int32   (N,),   same row chunking
    attrs     backbone, checkpoint_sha256, preprocessing, image_size, dataset,
              split, num_examples, feature_dim, num_classes, class_names (or
              null), chunk_rows, num_chunks, code_version, complete=True

While it is being built, everything lives in a work directory
``PATH.inprogress/`` that holds the Zarr group (``store.zarr``) and one done
marker per chunk (``done/chunk-000012``). A chunk's marker is written (by
atomic rename) only after both arrays' chunk files are on disk, and Zarr's
local store writes each chunk file by atomic rename too, so a SIGKILL at any
point leaves either a finished chunk with a marker or work that will be
redone. Chunk keys are never trusted as proof of completion (Zarr skips
all-fill chunks). `finalize_store` checks every marker, checks the data, then
renames the group to ``PATH`` in one step: a path that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

FORMAT_VERSION = 1
_REQUIRED_ATTRS = (
    "backbone",
    "checkpoint_sha256",
    "preprocessing",
    "image_size",
    "dataset",
    "split",
    "num_examples",
    "feature_dim",
    "num_classes",
)
_SHAPE_ATTRS = ("num_examples", "feature_dim")


class StoreError(RuntimeError):
    """A feature store is missing, incomplete, corrupt or inconsistent."""


def work_dir(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.inprogress")


def _group_path(path) -> Path:
    return work_dir(path) / "store.zarr"


def _marker(path, chunk: int) -> Path:
    return work_dir(path) / "done" / f"chunk-{chunk:06d}"


def num_chunks(num_examples: int, chunk_rows: int) -> int:
    return -(-num_examples // chunk_rows)


def chunk_bounds(chunk: int, num_examples: int, chunk_rows: int) -> tuple[int, int]:
    start = chunk * chunk_rows
    return start, min(start + chunk_rows, num_examples)


def shard_chunks(num_chunks: int, num_shards: int, shard: int) -> range:
    """The contiguous, balanced range of chunks that shard ``shard`` of ``num_shards`` fills.

    The ranges of all shards partition ``range(num_chunks)`` in order (shard k gets
    chunks ``[k*C//S, (k+1)*C//S)``), so shards read contiguous rows of the source
    and write disjoint chunk files. With more shards than chunks some ranges are empty.
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need num_shards >= 1 and 0 <= shard < S")
    return range(shard * num_chunks // num_shards, (shard + 1) * num_chunks // num_shards)


def describe_chunks(chunks: list[int], num_examples: int, chunk_rows: int, limit: int = 8) -> str:
    """Runs of chunk ids with their rows, e.g. 'chunks 3-5 (rows 192-383), 9 (rows 576-639)'."""
    runs: list[list[int]] = []
    for c in sorted(chunks):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    parts = []
    for a, b in runs[:limit]:
        rows = (
            chunk_bounds(a, num_examples, chunk_rows)[0],
            chunk_bounds(b, num_examples, chunk_rows)[1] - 1,
        )
        ids = f"{a}" if a == b else f"{a}-{b}"
        parts.append(f"{ids} (rows {rows[0]}-{rows[1]})")
    more = f", and {len(runs) - limit} more runs" if len(runs) > limit else ""
    return "chunks " + ", ".join(parts) + more


def _full_attrs(num_examples: int, feature_dim: int, chunk_rows: int, attrs: dict) -> dict:
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs and k not in _SHAPE_ATTRS]
    if missing:
        raise ValueError(f"store attributes missing: {missing}")
    if num_examples <= 0 or feature_dim <= 0 or chunk_rows <= 0:
        raise ValueError(
            f"invalid store shape: num_examples={num_examples}, feature_dim={feature_dim}, "
            f"chunk_rows={chunk_rows}"
        )
    full = dict(
        attrs,
        num_examples=int(num_examples),
        feature_dim=int(feature_dim),
        chunk_rows=int(chunk_rows),
        num_chunks=num_chunks(num_examples, chunk_rows),
        format_version=FORMAT_VERSION,
        complete=False,
    )
    return json.loads(json.dumps(full))  # normalise (tuples -> lists) for comparison


def _read_partial_attrs(path) -> dict:
    gpath = _group_path(path)
    try:
        return dict(zarr.open_group(str(gpath), mode="r").attrs)
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt work dir
        raise StoreError(
            f"{gpath}: unreadable partial store ({exc}); delete {work_dir(path)} to restart"
        ) from exc


def partial_attrs(path: str | os.PathLike) -> dict:
    """The attributes of the partial store (work directory) of ``path``."""
    if not _group_path(path).exists():
        raise StoreError(f"{work_dir(path)}: no partial store")
    return _read_partial_attrs(path)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Written by finalize_store just before publishing; a finalize killed in between must not
# make the work dir look like it came from other settings.
_FINALIZE_ATTRS = ("complete", "extraction_stats")


def _check_same_settings(path, old: dict, new: dict) -> None:
    old = {k: v for k, v in old.items() if k not in _FINALIZE_ATTRS}
    new = {k: v for k, v in new.items() if k not in _FINALIZE_ATTRS}
    if old == new:
        return
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    details = "; ".join(
        f"{k}: {_short(old.get(k))} in the work dir, {_short(new.get(k))} now" for k in diff
    )
    raise StoreError(
        f"{work_dir(path)}: a partial store built with different settings exists ({details}). "
        "Its finished chunks cannot be mixed with new ones: restore the old settings to "
        f"resume it, or delete {work_dir(path)} to start over"
    )


def check_store(
    path: str | os.PathLike,
    *,
    num_examples: int,
    feature_dim: int,
    chunk_rows: int,
    attrs: dict[str, Any],
) -> None:
    """Check that the partial store at ``path`` exists and was created with these settings.

    Shard jobs call this instead of `create_store`: only the init job writes metadata.
    """
    if not _group_path(path).exists():
        raise StoreError(
            f"{work_dir(path)}: no partial store; it is created once by create_store "
            "(the init_store job) before shards fill it"
        )
    full = _full_attrs(num_examples, feature_dim, chunk_rows, attrs)
    _check_same_settings(path, _read_partial_attrs(path), full)


def create_store(
    path: str | os.PathLike,
    *,
    num_examples: int,
    feature_dim: int,
    chunk_rows: int,
    attrs: dict[str, Any],
) -> None:
    """Pre-create the store's work directory, or check that it matches (resume).

    Idempotent: a rerun with the same attributes keeps all finished chunks; a
    rerun with different attributes (another backbone, size, dataset...) is an
    error, so that stale chunks can never be mixed into a new store.
    """
    full = _full_attrs(num_examples, feature_dim, chunk_rows, attrs)
    full = json.loads(json.dumps(full))  # normalise (tuples -> lists) for comparison
    gpath = _group_path(path)
    if gpath.exists():
        _check_same_settings(path, _read_partial_attrs(path), full)
        return
    done = work_dir(path) / "done"
    if done.exists():  # markers without a group are left from another store: never trust them
        shutil.rmtree(done)
    done.mkdir(parents=True, exist_ok=True)
    tmp = work_dir(path) / "store.zarr.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(str(tmp), mode="w", attributes=full)
    group.create_array(
        "features",
        shape=(num_examples, feature_dim),
        chunks=(chunk_rows, feature_dim),
        dtype="float32",
        compressors=zarr.codecs.ZstdCodec(level=1),
        dimension_names=("example", "feature"),
    )
    group.create_array(
        "labels",
        shape=(num_examples,),
        chunks=(chunk_rows,),
        dtype="int32",
        compressors=zarr.codecs.ZstdCodec(level=1),
        dimension_names=("example",),
    )
    os.replace(tmp, gpath)  # the group appears whole or not at all


def _open_partial(path, mode="r+") -> zarr.Group:
    gpath = _group_path(path)
    if not gpath.exists():
        raise StoreError(f"{work_dir(path)}: no partial store; call create_store first")
    return zarr.open_group(str(gpath), mode=mode)


def pending_chunks(path: str | os.PathLike) -> list[int]:
    """Chunks without a done marker, in order."""
    attrs = _open_partial(path, mode="r").attrs
    return [c for c in range(int(attrs["num_chunks"])) if not _marker(path, c).exists()]


def write_chunk(
    path: str | os.PathLike, chunk: int, features: np.ndarray, labels: np.ndarray
) -> None:
    """Write one whole chunk, then its done marker."""
    group = _open_partial(path)
    n, d = int(group.attrs["num_examples"]), int(group.attrs["feature_dim"])
    start, stop = chunk_bounds(chunk, n, int(group.attrs["chunk_rows"]))
    if features.shape != (stop - start, d) or labels.shape != (stop - start,):
        raise ValueError(
            f"chunk {chunk}: expected features {(stop - start, d)} and labels "
            f"{(stop - start,)}, got {features.shape} and {labels.shape}"
        )
    if not np.all(np.isfinite(features)):
        raise StoreError(f"{work_dir(path)}: chunk {chunk} has NaN or Inf features")
    group["features"][start:stop] = features.astype(np.float32, copy=False)
    group["labels"][start:stop] = labels.astype(np.int32, copy=False)
    marker = _marker(path, chunk)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(f"{start} {stop}\n")
    os.replace(tmp, marker)


def finalize_store(path: str | os.PathLike, extra_attrs: dict[str, Any] | None = None) -> None:
    """Check completeness and contents, then publish the store at `path` atomically.

    ``extra_attrs`` (for example ``extraction_stats``) are added to the group's
    attributes just before publishing; they must not overwrite the store's own.
    """
    group = _open_partial(path)
    missing = pending_chunks(path)
    if missing:
        attrs = group.attrs
        where = describe_chunks(missing, int(attrs["num_examples"]), int(attrs["chunk_rows"]))
        raise StoreError(
            f"{work_dir(path)}: {len(missing)} of {attrs['num_chunks']} chunks are not done "
            f"({where}); rerun the extraction (its shard jobs) to finish them"
        )
    store = _Checked(group, str(work_dir(path)))
    store.verify_contents()
    extra = dict(extra_attrs or {})
    clash = sorted(set(extra) & set(group.attrs))
    if clash:
        raise ValueError(f"extra_attrs would overwrite store attributes {clash}")
    group.attrs.update(json.loads(json.dumps(extra)))
    group.attrs["complete"] = True
    final = Path(path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(_group_path(path), final)
    shutil.rmtree(work_dir(path))


class _Checked:
    def __init__(self, group: zarr.Group, where: str):
        self.group, self.where = group, where

    def verify_contents(self) -> None:
        attrs = self.group.attrs
        num_classes = int(attrs["num_classes"])
        for start, feats, labels in _iter(self.group):
            bad = ~np.isfinite(feats)
            if bad.any():
                row = start + int(np.argwhere(bad)[0][0])
                raise StoreError(f"{self.where}: features row {row} is NaN or Inf")
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise StoreError(
                    f"{self.where}: labels out of range [0, {num_classes}) in rows "
                    f"{start}..{start + len(labels) - 1}"
                )


def _iter(group: zarr.Group) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    n, rows = int(group.attrs["num_examples"]), int(group.attrs["chunk_rows"])
    for c in range(num_chunks(n, rows)):
        start, stop = chunk_bounds(c, n, rows)
        yield start, group["features"][start:stop], group["labels"][start:stop]


class FeatureStore:
    """Read-only view of a finished store. Streams chunk by chunk; never loads all of it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an unfinished extraction exists)" if work_dir(path).exists() else ""
            raise StoreError(f"{self.path}: feature store not found{hint}")
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
            self.attrs = dict(self.group.attrs)
            features, labels = self.group["features"], self.group["labels"]
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"{self.path}: not a readable feature store ({exc})") from exc
        missing = [k for k in (*_REQUIRED_ATTRS, "chunk_rows", "complete") if k not in self.attrs]
        if missing:
            raise StoreError(f"{self.path}: store attributes missing {missing}")
        if self.attrs["complete"] is not True:
            raise StoreError(f"{self.path}: store is not marked complete")
        n, d = int(self.attrs["num_examples"]), int(self.attrs["feature_dim"])
        if features.shape != (n, d) or labels.shape != (n,):
            raise StoreError(
                f"{self.path}: arrays have shapes {features.shape}, {labels.shape}; "
                f"attributes say N={n}, d={d}"
            )
        self.num_examples, self.feature_dim = n, d
        self.num_classes = int(self.attrs["num_classes"])
        self.chunk_rows = int(self.attrs["chunk_rows"])

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.num_examples, self.chunk_rows)

    def chunk_sizes(self) -> list[int]:
        return [
            stop - start
            for start, stop in (
                chunk_bounds(c, self.num_examples, self.chunk_rows) for c in range(self.num_chunks)
            )
        ]

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """One chunk's (features, labels), checked for NaN/Inf and label range."""
        start, stop = chunk_bounds(chunk, self.num_examples, self.chunk_rows)
        feats = self.group["features"][start:stop]
        labels = self.group["labels"][start:stop]
        bad = ~np.isfinite(feats)
        if bad.any():
            row = start + int(np.argwhere(bad)[0][0])
            raise StoreError(f"{self.path}: features row {row} is NaN or Inf")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise StoreError(
                f"{self.path}: labels out of range [0, {self.num_classes}) in rows "
                f"{start}..{stop - 1}"
            )
        return feats, labels

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (features float32 (n_i, d), labels int32 (n_i,)) chunk by chunk, in order.

        Each example is yielded exactly once per call. NaN/Inf or out-of-range
        labels raise a StoreError naming the rows.
        """
        for c in range(self.num_chunks):
            yield self.read_chunk(c)

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything in memory; for small stores and tests only."""
        parts = list(self.iter_chunks())
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
