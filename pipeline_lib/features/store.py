"""The feature store: one Zarr v3 group per (dataset, backbone, split).

Layout of a finished store at ``PATH`` (for example ``.../train.zarr``)::

    features       float32 (N, d), chunked along N only
    labels         int32   (N,),   same row chunking
    attrs          backbone, checkpoint_sha256, preprocessing, image_size, dataset,
                   split, num_examples, feature_dim, num_classes, class_names (or
                   null), chunk_rows, num_chunks, code_version, complete=True
    manifest.json  size and sha256 of every chunk file and of the three zarr.json
                   metadata files (with a copy of their text), the recipe that made
                   the store, and the sha256 of the manifest itself

While it is being built, everything lives in a work directory
``PATH.inprogress/`` that holds the Zarr group (``store.zarr``) and one done
marker per chunk (``done/chunk-000012``). A chunk's marker is written (by
atomic rename) only after both arrays' chunk files are on disk, and records
the size and sha256 of each stored chunk file; Zarr's local store writes each
chunk file by atomic rename too, so a SIGKILL at any point leaves either a
finished chunk with a marker or work that will be redone. Chunk keys are never
trusted as proof of completion (Zarr skips all-fill chunks). `finalize_store`
checks every chunk against its marker, checks the data, writes the manifest,
then renames the group to ``PATH`` in one step: a path that exists is complete.

Reads are verified. `FeatureStore` checks the manifest and the metadata when it
opens a store, the presence and size of every chunk file, and the sha256 of
each chunk file it reads before decoding it. A missing, truncated, altered or
swapped file raises `StoreDamagedError` naming the store, the chunk and its
rows, the fault and the repair command (`repair_command`); it is never read
as fill values.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs

from pipeline_lib import integrity

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: chunk checksums in done markers and manifest.json
MANIFEST = "manifest.json"
METADATA_FILES = ("zarr.json", "features/zarr.json", "labels/zarr.json")
_MANIFEST_FORMAT = "dp-features-manifest/1"
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
_ARRAYS = ("features", "labels")
_DTYPES = {"features": "<f4", "labels": "<i4"}


class StoreError(RuntimeError):
    """A feature store is missing, incomplete, corrupt or inconsistent."""


class StoreDamagedError(StoreError):
    """A file of a feature store is missing or damaged; it was not read as data.

    Attributes: ``store``, ``path`` (the file), ``chunk`` and ``rows`` (None for
    metadata), ``fault`` (see `pipeline_lib.integrity.FAULTS`) and ``repair``.
    """

    def __init__(self, store, path, fault, detail, repair, chunk=None, rows=None):
        self.store, self.path, self.fault, self.repair = str(store), str(path), fault, repair
        self.chunk, self.rows = chunk, rows
        where = f"chunk {chunk} (rows {rows[0]}-{rows[1] - 1}), " if chunk is not None else ""
        super().__init__(
            f"{store}: {where}file {path}: {fault}: {detail}. It was not read as data. "
            f"Repair: {repair}"
        )


class UnfinishedChunksDamagedError(StoreError):
    """Finished chunks of a partial store were damaged before publishing; their markers are gone."""


def repair_command(path: str | os.PathLike) -> str:
    """The one command that repairs the finished store at ``path`` in place."""
    return f"python -m pipeline_lib.features.verify --repair {os.fspath(path)}"


def rebuild_command(path: str | os.PathLike) -> str:
    """The command that rebuilds a store that cannot be repaired (its manifest is lost)."""
    return f"rm -r {os.fspath(path)} && snakemake --cores all"


def work_dir(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.inprogress")


def _group_path(path) -> Path:
    return work_dir(path) / "store.zarr"


def _marker(path, chunk: int) -> Path:
    return work_dir(path) / "done" / f"chunk-{chunk:06d}"


def _recipe_path(path) -> Path:
    return work_dir(path) / "recipe.json"


def num_chunks(num_examples: int, chunk_rows: int) -> int:
    return -(-num_examples // chunk_rows)


def chunk_bounds(chunk: int, num_examples: int, chunk_rows: int) -> tuple[int, int]:
    start = chunk * chunk_rows
    return start, min(start + chunk_rows, num_examples)


def chunk_key(array: str, chunk: int) -> str:
    """The file of ``chunk`` of ``array`` inside the group (Zarr v3 default key encoding)."""
    return f"features/c/{chunk}/0" if array == "features" else f"labels/c/{chunk}"


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


def _settings_diff(old: dict, new: dict) -> str:
    old = {k: v for k, v in old.items() if k not in _FINALIZE_ATTRS}
    new = {k: v for k, v in new.items() if k not in _FINALIZE_ATTRS}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(
        f"{k}: {_short(old.get(k))} in the work dir, {_short(new.get(k))} now" for k in diff
    )


def _check_same_settings(path, old: dict, new: dict) -> None:
    details = _settings_diff(old, new)
    if not details:
        return
    raise StoreError(
        f"{work_dir(path)}: a partial store built with different settings exists ({details}). "
        "Its finished chunks cannot be mixed with new ones: rerun its init_store job (or "
        "create_store), which replaces it, or restore the old settings to resume it"
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


def _write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def create_store(
    path: str | os.PathLike,
    *,
    num_examples: int,
    feature_dim: int,
    chunk_rows: int,
    attrs: dict[str, Any],
    recipe: dict[str, Any] | None = None,
) -> None:
    """Pre-create the store's work directory, or check that it matches (resume).

    Idempotent: a rerun with the same attributes keeps all finished chunks. A
    work directory left by different attributes (another backbone, size, N after
    a bad image was removed...) is replaced: every attribute recorded in the
    store can change the stored bytes or the rows they belong to, so none of its
    chunks can be reused, and stale chunks are never mixed into a new store.

    ``recipe`` (JSON) is how to rebuild the store (dataset spec, backbone options,
    extraction settings); it goes into the manifest so that damaged chunks can be
    re-extracted by `pipeline_lib.features.verify`.
    """
    full = _full_attrs(num_examples, feature_dim, chunk_rows, attrs)
    gpath = _group_path(path)
    if gpath.exists():
        try:
            old = dict(zarr.open_group(str(gpath), mode="r").attrs)
        except Exception as exc:  # noqa: BLE001 - unreadable: nothing in it can be trusted
            old, why = None, f"its metadata is unreadable ({exc})"
        else:
            why = _settings_diff(old, full)
        if old is not None and not why:
            if recipe is not None:
                _write_json_atomic(_recipe_path(path), recipe)
            return
        log.warning(
            "%s: replacing a partial store that no chunk of can be reused (%s)",
            work_dir(path),
            why,
        )
        shutil.rmtree(gpath)
    done = work_dir(path) / "done"
    if done.exists():  # markers without a group are left from another store: never trust them
        shutil.rmtree(done)
    done.mkdir(parents=True, exist_ok=True)
    if recipe is not None:
        _write_json_atomic(_recipe_path(path), recipe)
    tmp = work_dir(path) / "store.zarr.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    _create_group(tmp, num_examples, feature_dim, chunk_rows, full)
    os.replace(tmp, gpath)  # the group appears whole or not at all


def _create_group(where: Path, num_examples, feature_dim, chunk_rows, attrs) -> None:
    group = zarr.open_group(str(where), mode="w", attributes=attrs)
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


def _open_partial(path, mode="r+") -> zarr.Group:
    gpath = _group_path(path)
    if not gpath.exists():
        raise StoreError(f"{work_dir(path)}: no partial store; call create_store first")
    return zarr.open_group(str(gpath), mode=mode)


def _piece_record(root: Path, key: str) -> dict:
    """Size and sha256 of one stored chunk file; size None when Zarr stored nothing (all fill)."""
    try:
        data = (root / key).read_bytes()
    except FileNotFoundError:
        return {"key": key, "size": None, "sha256": None}
    return {"key": key, "size": len(data), "sha256": integrity.digest_bytes(data)}


def _read_marker(path, chunk: int) -> dict | None:
    """A marker's record, or None when absent or not of this format (the chunk is redone)."""
    try:
        record = json.loads(_marker(path, chunk).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict) or any(a not in record for a in _ARRAYS):
        return None
    return record


def _piece_fault(root: Path, rec: dict, *, full: bool) -> tuple[str, str] | None:
    """(fault, detail) when the file of ``rec`` does not match it; None when it does.

    ``full`` reads and hashes the file; otherwise only presence and size are checked.
    """
    p = root / rec["key"]
    if rec["size"] is None:  # all-fill chunk, never written: a file there is foreign
        return ("checksum", "a file exists where Zarr wrote none") if p.exists() else None
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return "missing", "the chunk file is gone"
    if size != rec["size"]:
        return "size", f"{size} bytes, {rec['size']} were written"
    if full and integrity.digest_file(p) != rec["sha256"]:
        return "checksum", "its bytes differ from what was written (sha256 mismatch)"
    return None


def pending_chunks(path: str | os.PathLike, chunks=None, *, verify: bool = False) -> list[int]:
    """Chunks (of ``chunks``, default all) without a valid done marker, in order.

    A marker is valid when its chunk files are present with the recorded sizes
    (and, with ``verify``, the recorded sha256): a chunk damaged after it was
    written is redone, never kept.
    """
    attrs = _open_partial(path, mode="r").attrs
    total = int(attrs["num_chunks"])
    root = _group_path(path)
    records = _done_records(path, total)
    out = []
    for c in range(total) if chunks is None else chunks:
        record = records[c]
        if record is None or any(
            _piece_fault(root, record[a], full=verify) is not None for a in _ARRAYS
        ):
            out.append(c)
    return out


def write_chunk(
    path: str | os.PathLike, chunk: int, features: np.ndarray, labels: np.ndarray
) -> None:
    """Write one whole chunk, then its done marker with the checksums of the stored files."""
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
    root = _group_path(path)
    try:
        group["features"][start:stop] = features.astype(np.float32, copy=False)
        group["labels"][start:stop] = labels.astype(np.int32, copy=False)
        record = {
            "chunk": chunk,
            "rows": [start, stop],
            **{a: _piece_record(root, chunk_key(a, chunk)) for a in _ARRAYS},
        }
        _write_json_atomic(_marker(path, chunk), record)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"{work_dir(path)}: the disk is full while writing chunk {chunk} (rows "
                f"{start}-{stop - 1}); finished chunks are kept. Free space, then rerun "
                "the extraction: it resumes at this chunk"
            ) from exc
        raise


def _manifest_payload(root: Path, chunk_records: list[dict], recipe) -> dict:
    metadata, text = {}, {}
    for name in METADATA_FILES:
        data = (root / name).read_bytes()
        metadata[name] = {"size": len(data), "sha256": integrity.digest_bytes(data)}
        text[name] = data.decode()
    body = {
        "format": _MANIFEST_FORMAT,
        "algorithm": integrity.ALGORITHM,
        "metadata": metadata,
        "metadata_text": text,
        "chunks": chunk_records,
        "recipe": recipe,
    }
    return dict(body, manifest_sha256=integrity.json_digest(body))


def finalize_store(path: str | os.PathLike, extra_attrs: dict[str, Any] | None = None) -> None:
    """Check completeness, checksums and contents, then publish the store at `path` atomically.

    ``extra_attrs`` (for example ``extraction_stats``) are added to the group's
    attributes just before publishing; they must not overwrite the store's own.

    Steps, each safe to be killed after (a rerun redoes the rest): add the
    attributes; write the manifest into the group; drop the done markers (the
    manifest now holds their records); rename the group to ``path``; remove the
    emptied work directory.
    """
    group = _open_partial(path)
    attrs = group.attrs
    n, rows, total = int(attrs["num_examples"]), int(attrs["chunk_rows"]), int(attrs["num_chunks"])
    records = _done_records(path, total)
    missing = [c for c in range(total) if records[c] is None]
    if missing:
        where = describe_chunks(missing, n, rows)
        raise StoreError(
            f"{work_dir(path)}: {len(missing)} of {total} chunks are not done "
            f"({where}); rerun the extraction (its shard jobs) to finish them"
        )
    root = _group_path(path)
    damaged = [
        c
        for c in range(total)
        if any(_piece_fault(root, records[c][a], full=True) for a in _ARRAYS)
    ]
    if damaged:
        for c in damaged:  # the rerun redoes them
            _marker(path, c).unlink(missing_ok=True)
        raise UnfinishedChunksDamagedError(
            f"{work_dir(path)}: {len(damaged)} finished chunks were damaged on disk after they "
            f"were written ({describe_chunks(damaged, n, rows)}); their done markers are "
            "removed, so rerunning the extraction (snakemake --cores all) redoes exactly those"
        )
    _Checked(group, str(work_dir(path))).verify_contents()
    extra = json.loads(json.dumps(dict(extra_attrs or {})))
    clash = sorted(set(extra) & (set(group.attrs) - set(_FINALIZE_ATTRS)))
    if clash:
        raise ValueError(f"extra_attrs would overwrite store attributes {clash}")
    group.attrs.update(extra)
    group.attrs["complete"] = True
    _write_json_atomic(root / MANIFEST, _manifest_payload(root, records, _recipe(path)))
    if (work_dir(path) / "done").exists():
        shutil.rmtree(work_dir(path) / "done")
    _recipe_path(path).unlink(missing_ok=True)  # in the manifest now
    final = Path(path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(root, final)
    shutil.rmtree(work_dir(path))


def _recipe(path) -> dict | None:
    """The recipe of the partial store: its file, or the manifest of a killed finalize."""
    if _recipe_path(path).exists():
        return json.loads(_recipe_path(path).read_text())
    try:
        return _load_manifest(_group_path(path), _group_path(path)).get("recipe")
    except StoreError:
        return None


def _done_records(path, total: int) -> list[dict | None]:
    """Each chunk's record: from its done marker, or from the manifest a killed finalize wrote."""
    records: list[dict | None] = [_read_marker(path, c) for c in range(total)]
    if any(r is None for r in records):
        try:
            manifest = _load_manifest(_group_path(path), _group_path(path))
        except StoreError:
            return records
        for c in range(total):
            if records[c] is None and c < len(manifest["chunks"]):
                records[c] = manifest["chunks"][c]
    return records


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


def _load_manifest(root: Path, store) -> dict:
    """The manifest of the group at ``root``, its own sha256 checked."""
    path = root / MANIFEST
    fix = rebuild_command(store)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StoreDamagedError(
            store,
            path,
            "missing",
            "the store has no checksum manifest (stores built before checksums existed have "
            "none; nothing in it can be checked)",
            fix,
        ) from None
    try:
        manifest = json.loads(text)
        body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        ok = manifest.get("manifest_sha256") == integrity.json_digest(body)
    except (ValueError, AttributeError, TypeError):
        raise StoreDamagedError(store, path, "unreadable", "not a JSON manifest", fix) from None
    if not ok:
        raise StoreDamagedError(
            store, path, "checksum", "the manifest does not match its own sha256", fix
        )
    if manifest.get("format") != _MANIFEST_FORMAT:
        raise StoreDamagedError(
            store, path, "unreadable", f"unknown manifest format {manifest.get('format')!r}", fix
        )
    return manifest


def check_manifest_matches(root: Path, store, manifest: dict) -> None:
    """Raise when the manifest describes another store's files (e.g. copied from another run).

    A damaged file shows as one metadata file or a few chunks that differ; a foreign
    manifest as metadata that differs together with most chunk files.
    """
    meta_off = False
    for name in METADATA_FILES:
        p, rec = root / name, manifest["metadata"][name]
        if not p.exists() or p.stat().st_size != rec["size"]:
            meta_off = True
        elif integrity.digest_file(p) != rec["sha256"]:
            meta_off = True
    chunks = manifest["chunks"]
    off = sum(1 for r in chunks if any(_piece_fault(root, r[a], full=False) for a in _ARRAYS))
    if meta_off and len(chunks) > 1 and 2 * off > len(chunks):
        raise StoreDamagedError(
            store,
            root / MANIFEST,
            "mismatch",
            f"it does not describe this store: its metadata and {off} of {len(chunks)} chunk "
            "files differ from it (e.g. a manifest copied from another run)",
            rebuild_command(store),
        )


def _check_layout(store: Path, meta: dict, name: str, chunk_rows: int, feature_dim: int) -> None:
    """The array layout the verified reader decodes: little-endian bytes + zstd, default keys."""
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    endian = meta.get("codecs", [{}])[0].get("configuration", {}).get("endian")
    keys = meta.get("chunk_key_encoding", {})
    shape = [chunk_rows, feature_dim] if name == "features" else [chunk_rows]
    if (
        codecs != ["bytes", "zstd"]
        or endian != "little"
        or keys.get("name") != "default"
        or keys.get("configuration", {}).get("separator") != "/"
        or meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") != shape
        or meta.get("data_type") != ("float32" if name == "features" else "int32")
    ):
        raise StoreError(
            f"{store}: {name} has a layout this reader does not verify ({meta.get('codecs')}, "
            f"{keys}); rebuild it: {rebuild_command(store)}"
        )


class FeatureStore:
    """Verified, read-only view of a finished store. Streams chunk by chunk.

    Opening checks the manifest, the metadata files and the presence and size of
    every chunk file; each chunk read is checked against its sha256 before it is
    decoded. Damage raises `StoreDamagedError`; nothing damaged is returned.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an unfinished extraction exists)" if work_dir(path).exists() else ""
            raise StoreError(f"{self.path}: feature store not found{hint}")
        self.repair = repair_command(self.path)
        self.manifest = _load_manifest(self.path, self.path)
        check_manifest_matches(self.path, self.path, self.manifest)
        meta = {}
        for name in METADATA_FILES:
            rec = self.manifest["metadata"][name]
            try:
                data = integrity.check_file(
                    self.path / name, rec["size"], rec["sha256"], self.repair, "the metadata file"
                )
            except integrity.IntegrityError as exc:
                raise StoreDamagedError(
                    self.path, self.path / name, exc.fault, exc.detail, self.repair
                ) from None
            meta[name] = json.loads(data)
        self.attrs = dict(meta["zarr.json"].get("attributes", {}))
        missing = [k for k in (*_REQUIRED_ATTRS, "chunk_rows", "complete") if k not in self.attrs]
        if missing:
            raise StoreError(f"{self.path}: store attributes missing {missing}")
        if self.attrs["complete"] is not True:
            raise StoreError(f"{self.path}: store is not marked complete")
        n, d = int(self.attrs["num_examples"]), int(self.attrs["feature_dim"])
        self.num_examples, self.feature_dim = n, d
        self.num_classes = int(self.attrs["num_classes"])
        self.chunk_rows = int(self.attrs["chunk_rows"])
        shapes = (meta["features/zarr.json"].get("shape"), meta["labels/zarr.json"].get("shape"))
        if shapes != ([n, d], [n]):
            raise StoreError(
                f"{self.path}: arrays have shapes {shapes}; attributes say N={n}, d={d}"
            )
        for name in _ARRAYS:
            _check_layout(self.path, meta[f"{name}/zarr.json"], name, self.chunk_rows, d)
        self._records = self.manifest["chunks"]
        self._check_coverage()
        # What the data is: the checksums of every chunk file (not timings in the attributes)
        self.content_digest = integrity.json_digest(self._records)
        damaged = [c for c in range(self.num_chunks) if self._quick_fault(c)]
        if damaged:
            c = damaged[0]
            fault, detail, key = self._quick_fault(c)
            raise StoreDamagedError(
                self.path,
                self.path / key,
                fault,
                f"{detail}; {len(damaged)} damaged in all: "
                + describe_chunks(damaged, n, self.chunk_rows),
                self.repair,
                chunk=c,
                rows=chunk_bounds(c, n, self.chunk_rows),
            )

    def _check_coverage(self) -> None:
        """The manifest's chunks cover rows 0..N-1 exactly once, in order."""
        expected = [
            list(chunk_bounds(c, self.num_examples, self.chunk_rows))
            for c in range(self.num_chunks)
        ]
        got = [r.get("rows") for r in self._records]
        if got != expected:
            raise StoreDamagedError(
                self.path,
                self.path / MANIFEST,
                "mismatch",
                f"its chunks do not cover rows 0-{self.num_examples - 1} exactly once",
                rebuild_command(self.path),
            )

    def _quick_fault(self, chunk: int) -> tuple[str, str, str] | None:
        for a in _ARRAYS:
            rec = self._records[chunk][a]
            fault = _piece_fault(self.path, rec, full=False)
            if fault:
                return (*fault, rec["key"])
        return None

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

    def _read_piece(self, chunk: int, array: str, rows: tuple[int, int]) -> np.ndarray:
        """One array's chunk: file read, size and sha256 checked, then decoded."""
        rec = self._records[chunk][array]
        n = rows[1] - rows[0]
        shape = (self.chunk_rows, self.feature_dim) if array == "features" else (self.chunk_rows,)
        p = self.path / rec["key"]
        if rec["size"] is None:  # an all-fill chunk: Zarr wrote no file
            fault = _piece_fault(self.path, rec, full=False)
            if fault:
                raise StoreDamagedError(self.path, p, *fault, self.repair, chunk, rows)
            return np.zeros(shape, _DTYPES[array])[:n].astype(_DTYPES[array][1:])
        try:
            data = integrity.check_file(
                p, rec["size"], rec["sha256"], self.repair, f"the {array} chunk"
            )
        except integrity.IntegrityError as exc:
            raise StoreDamagedError(
                self.path, p, exc.fault, exc.detail, self.repair, chunk, rows
            ) from None
        raw = numcodecs.Zstd().decode(data)
        flat = np.frombuffer(raw, _DTYPES[array])
        return flat.reshape(shape)[:n].astype(_DTYPES[array][1:])

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """One chunk's (features, labels), checksums verified, checked for NaN/Inf and labels."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"{self.path}: chunk {chunk} of {self.num_chunks}")
        start, stop = chunk_bounds(chunk, self.num_examples, self.chunk_rows)
        feats = self._read_piece(chunk, "features", (start, stop))
        labels = self._read_piece(chunk, "labels", (start, stop))
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

    def read_labels(self) -> np.ndarray:
        """int32 (N,) labels of every row, each label chunk verified; no feature is read."""
        parts = []
        for c in range(self.num_chunks):
            rows = chunk_bounds(c, self.num_examples, self.chunk_rows)
            parts.append(self._read_piece(c, "labels", rows))
        return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (features float32 (n_i, d), labels int32 (n_i,)) chunk by chunk, in order.

        Each example is yielded exactly once per call. The next chunk is read and
        verified in a background thread while the caller works on this one.
        NaN/Inf, out-of-range labels or a damaged chunk raise a StoreError naming
        the rows; chunks before it have been yielded, none after.
        """
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self.read_chunk, 0) if self.num_chunks else None
            for c in range(self.num_chunks):
                chunk = ahead.result()
                ahead = pool.submit(self.read_chunk, c + 1) if c + 1 < self.num_chunks else None
                yield chunk

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything in memory; for small stores and tests only."""
        parts = list(self.iter_chunks())
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
