"""Feature combinations: a store whose rows concatenate the rows of several stores.

A combined store is derived from finished, verified feature stores of the same
dataset and split (several backbones, image sizes or test-time augmentations):
row i is the concatenation, in the order given, of row i of every source,
each optionally scaled to unit L2 norm first (``source_normalization: l2``).
It is written like an extracted store (work directory, one done marker per
chunk, checksum manifest, atomic publish), so it is resumable, verified when
read, and repairable in place: its recipe names the sources and the sha256 of
their manifests, and ``python -m pipeline_lib.features.verify --repair``
recomputes damaged chunks from them, accepted only when bit-identical.

Privacy: nothing here looks at more than one example at a time. Row i of the
result depends on row i of each source only (per-source L2 normalisation is a
fixed function of that example's own vector, with no statistic of the data), so
each example still contributes one vector and every head's sensitivity analysis,
which clips or normalises that vector, holds unchanged. Scaling each source to
unit norm is useful because the heads' ``normalize`` transform scales the whole
concatenated vector: without it the source with the larger raw norm dominates
(EfficientNet-Lite pre-logits have norms of tens, ScatterNet's of a few units).

Refused, with an error naming the stores: sources of another dataset or split,
another number of rows or classes, other class names, or labels that differ in
any row (rows must be the same examples in the same order).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

import pipeline_lib
from pipeline_lib import integrity
from pipeline_lib.features import store as fstore

log = logging.getLogger(__name__)

__all__ = ["SOURCE_NORMALIZATIONS", "CombineError", "combine_stores", "combined_attrs"]

SOURCE_NORMALIZATIONS = ("none", "l2")
# Source attributes that must agree: rows are the same examples in the same order.
_SAME = ("dataset", "split", "num_examples", "num_classes", "class_names")


class CombineError(fstore.StoreError):
    """The source stores cannot be combined row by row; the message names them."""


def _source_record(label: str, st: fstore.FeatureStore) -> dict:
    rec = {
        "name": label,
        "store": str(st.path),
        "backbone": st.attrs["backbone"],
        "image_size": int(st.attrs["image_size"]),
        "feature_dim": int(st.feature_dim),
        "checkpoint_sha256": st.attrs["checkpoint_sha256"],
        "manifest_sha256": st.manifest["manifest_sha256"],
    }
    if "tta" in st.attrs:
        rec["tta"] = st.attrs["tta"]
    return rec


def _check_aligned(stores: Sequence[tuple[str, fstore.FeatureStore]]) -> None:
    (first_label, first), *rest = stores
    for label, st in rest:
        for key in _SAME:
            if st.attrs.get(key) != first.attrs.get(key):
                raise CombineError(
                    f"cannot combine {first.path} ({first_label}) with {st.path} ({label}): "
                    f"{key} is {first.attrs.get(key)!r} in the first and {st.attrs.get(key)!r} "
                    "in the second; a combination needs the same examples in the same order"
                )
    labels = first.read_labels()
    for label, st in rest:
        other = st.read_labels()
        if not np.array_equal(labels, other):
            row = int(np.flatnonzero(labels != other)[0])
            raise CombineError(
                f"cannot combine {first.path} ({first_label}) with {st.path} ({label}): row "
                f"{row} has label {int(labels[row])} in the first and {int(other[row])} in the "
                f"second ({int(np.sum(labels != other))} rows differ); rows must be the same "
                "examples in the same order (were they extracted from other data?)"
            )


def combined_attrs(
    name: str,
    sources: Sequence[tuple[str, fstore.FeatureStore]],
    *,
    image_size: int,
    source_normalization: str,
) -> dict:
    """The attributes of the combined store (its identity: a change replaces a partial one).

    ``checkpoint_sha256`` is the digest of the sources' (backbone, checkpoint sha256,
    image size, tta) list; ``sources`` lists each source store with its manifest sha256.
    """
    records = [_source_record(label, st) for label, st in sources]
    first = sources[0][1].attrs
    described = "; ".join(
        f"[{i}] {r['name']}: {r['backbone']} at {r['image_size']}px, d={r['feature_dim']}"
        f"{', tta: ' + r['tta'] if 'tta' in r else ''}"
        for i, r in enumerate(records)
    )
    return {
        "backbone": name,
        "checkpoint_sha256": integrity.json_digest(
            [
                [r["backbone"], r["checkpoint_sha256"], r["image_size"], r.get("tta", "none")]
                for r in records
            ]
        ),  # fmt: skip
        "preprocessing": (
            f"concatenation of {len(records)} feature stores ({described}); "
            f"per-source normalisation: {source_normalization}"
        ),
        "image_size": int(image_size),
        "dataset": first["dataset"],
        "split": first["split"],
        "source": first.get("source"),
        "num_classes": int(first["num_classes"]),
        "class_names": first.get("class_names"),
        "sources": records,
        "source_normalization": source_normalization,
        "code_version": pipeline_lib.__version__,
    }


class _RowReader:
    """Rows [a, b) of a store's features, reading each source chunk once in order."""

    def __init__(self, st: fstore.FeatureStore):
        self.st, self.chunk, self.data = st, None, None

    def rows(self, a: int, b: int) -> np.ndarray:
        r = self.st.chunk_rows
        parts = []
        for c in range(a // r, (b - 1) // r + 1):
            if c != self.chunk:
                self.chunk, self.data = c, self.st.read_chunk(c)[0]
            lo = max(a, c * r) - c * r
            hi = min(b, (c + 1) * r) - c * r
            parts.append(self.data[lo:hi])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _normalise(x: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return x
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    # a zero vector stays zero (it has no direction to keep)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def combine_stores(
    out_path: str | os.PathLike,
    sources: Sequence[tuple[str, str | os.PathLike]],
    *,
    name: str,
    image_size: int,
    source_normalization: str = "none",
    chunk_rows: int = 1024,
    chunks: Iterable[int] | None = None,
    finalize: bool = True,
    recipe: dict | None = None,
) -> dict:
    """Build (or resume) the combined store at ``out_path`` from ``sources``.

    Args:
      sources: (label, path of a finished store) pairs, in concatenation order; the
        label (for example ``efficientnet_lite0@128px``) names the source in errors
        and in the store's attributes.
      name: the combination's name (the store's ``backbone`` attribute).
      image_size: the size in the store's path (the size of sources that set none).
      source_normalization: "none", or "l2": each source's vector to unit L2 norm.
      chunks: only these chunks (repair); None: every pending chunk.
      finalize: publish the store when every chunk is done.
      recipe: kept in the manifest; the workflow's names the sources and their manifests.

    Returns figures: rows written, seconds, rows per second, chunks done and skipped.
    """
    if source_normalization not in SOURCE_NORMALIZATIONS:
        raise ValueError(
            f"source_normalization={source_normalization!r}; use one of {SOURCE_NORMALIZATIONS}"
        )
    if len(sources) < 2:
        raise ValueError(f"a combination needs at least two source stores, got {len(sources)}")
    t0 = time.perf_counter()
    opened = [(label, fstore.FeatureStore(path)) for label, path in sources]
    _check_aligned(opened)
    attrs = combined_attrs(
        name, opened, image_size=image_size, source_normalization=source_normalization
    )
    n = opened[0][1].num_examples
    d = sum(st.feature_dim for _, st in opened)
    if recipe is None:
        recipe = {"combine": combine_recipe(attrs, source_normalization)}
    fstore.create_store(
        out_path, num_examples=n, feature_dim=d, chunk_rows=chunk_rows, attrs=attrs, recipe=recipe
    )
    total = fstore.num_chunks(n, chunk_rows)
    wanted = range(total) if chunks is None else sorted(set(chunks))
    todo = fstore.pending_chunks(out_path, list(wanted), verify=True)
    readers = [_RowReader(st) for _, st in opened]
    labels = opened[0][1].read_labels()
    rows = 0
    for c in todo:
        a, b = fstore.chunk_bounds(c, n, chunk_rows)
        parts = [_normalise(r.rows(a, b), source_normalization) for r in readers]
        fstore.write_chunk(out_path, c, np.concatenate(parts, axis=1), labels[a:b])
        rows += b - a
    seconds = time.perf_counter() - t0
    stats = {
        "kind": "combine",
        "rows_written": rows,
        "chunks_done": len(todo),
        "chunks_already_done": len(wanted) - len(todo),
        "seconds": seconds,
        "rows_per_second": rows / seconds if seconds > 0 else None,
    }
    log.info("combined %d rows of %s into %s: %s", rows, name, out_path, stats)
    if finalize and not fstore.pending_chunks(out_path):
        fstore.finalize_store(out_path, extra_attrs={"extraction_stats": stats})
    return stats


def combine_recipe(attrs: dict, source_normalization: str) -> dict:
    """How to rebuild a combined store: its name, size, normalisation and sources."""
    return {
        "name": attrs["backbone"],
        "image_size": attrs["image_size"],
        "source_normalization": source_normalization,
        "sources": [
            {"name": r["name"], "store": r["store"], "manifest_sha256": r["manifest_sha256"]}
            for r in attrs["sources"]
        ],
    }


def repair_chunks(path: Path, manifest: dict, chunks: list[int]) -> tuple[Path, Path]:
    """Recompute ``chunks`` of the combined store at ``path`` from its recorded sources into
    a scratch store next to it; (scratch path, its group directory). Sources whose manifest
    changed since are refused (the chunks could not come out the same)."""
    recipe = manifest["recipe"]["combine"]
    attrs = json.loads(manifest["metadata_text"]["zarr.json"])["attributes"]
    for src in recipe["sources"]:
        now = fstore.FeatureStore(src["store"]).manifest["manifest_sha256"]
        if now != src["manifest_sha256"]:
            raise fstore.StoreError(
                f"{path}: its source {src['store']} ({src['name']}) has changed since it was "
                f"combined (manifest sha256 {now[:12]}..., recorded "
                f"{src['manifest_sha256'][:12]}...); rebuild it: {fstore.rebuild_command(path)}"
            )
    scratch = Path(f"{path}.repair")
    combine_stores(
        scratch,
        [(s["name"], s["store"]) for s in recipe["sources"]],
        name=recipe["name"],
        image_size=int(recipe["image_size"]),
        source_normalization=recipe["source_normalization"],
        chunk_rows=int(attrs["chunk_rows"]),
        chunks=chunks,
        finalize=False,
        recipe=manifest["recipe"],
    )
    return scratch, fstore._group_path(scratch)
