"""Verify a finished feature store, and repair it in place by re-extracting damaged chunks.

Usage::

    python -m pipeline_lib.features.verify STORE...            # check; exit 1 if damaged
    python -m pipeline_lib.features.verify --repair STORE...   # check and repair in place

Verification reads every file of the store and compares it with the manifest
(`pipeline_lib.features.store`). Repair:

* restores damaged metadata files (``zarr.json``) from the copy in the manifest;
* re-extracts only the damaged chunks, with the store's recorded settings and
  recipe (dataset spec, backbone options), into a scratch store next to it;
* checks that each re-extracted chunk file has exactly the sha256 recorded in
  the manifest (the same program on the same inputs gives the same bytes), and
  only then moves it into the store by atomic rename. A chunk that would come
  out different (other device count, other code) is refused, not written.

The result is bit-identical to the undamaged store, so the store's Snakemake
timestamp is left alone: finished statistics and heads stay valid and are not
rerun; jobs that failed on the damage are rerun by the next ``snakemake``.
A store whose manifest is lost cannot be checked and must be rebuilt
(`store.rebuild_command`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from pipeline_lib import integrity
from pipeline_lib.features import store as fstore

log = logging.getLogger(__name__)

__all__ = ["make_recipe", "main", "repair_store", "verify_store"]


def make_recipe(
    *,
    dataset: str,
    dataset_spec: Mapping,
    split: str,
    backbone: str,
    backbone_options: Mapping | None,
    extraction: Mapping,
) -> dict:
    """What `repair_store` needs to reopen the source and the backbone (JSON)."""
    return json.loads(
        json.dumps(
            {
                "dataset": dataset,
                "dataset_spec": dict(dataset_spec),
                "split": split,
                "backbone": backbone,
                "backbone_options": dict(backbone_options or {}),
                "extraction": dict(extraction),
            }
        )
    )


def _metadata_faults(path: Path, manifest: dict) -> list[fstore.StoreDamagedError]:
    out = []
    for name in fstore.METADATA_FILES:
        rec = manifest["metadata"][name]
        try:
            integrity.check_file(path / name, rec["size"], rec["sha256"], "", "the metadata file")
        except integrity.IntegrityError as exc:
            out.append(
                fstore.StoreDamagedError(
                    path, path / name, exc.fault, exc.detail, fstore.repair_command(path)
                )
            )
    return out


def _chunk_faults(path: Path, manifest: dict) -> list[fstore.StoreDamagedError]:
    out = []
    for c, rec in enumerate(manifest["chunks"]):
        for a in ("features", "labels"):
            fault = fstore._piece_fault(path, rec[a], full=True)
            if fault:
                out.append(
                    fstore.StoreDamagedError(
                        path,
                        path / rec[a]["key"],
                        *fault,
                        fstore.repair_command(path),
                        chunk=c,
                        rows=tuple(rec["rows"]),
                    )
                )
    return out


def verify_store(path: str | os.PathLike) -> list[fstore.StoreDamagedError]:
    """Every damaged file of the store at ``path`` (empty when it is intact).

    Raises StoreDamagedError when the manifest itself is missing or damaged.
    """
    path = Path(path)
    manifest = fstore._load_manifest(path, path)
    fstore.check_manifest_matches(path, path, manifest)
    return _metadata_faults(path, manifest) + _chunk_faults(path, manifest)


def _replace_file(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.repair.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def _open_source(recipe: dict):
    from pipeline_lib.data import open_dataset

    return open_dataset(recipe["dataset"], recipe["dataset_spec"], recipe["split"])


def _reextract(path: Path, manifest: dict, chunks: list[int], source, backbone_options):
    """Extract ``chunks`` into a scratch store with the store's settings; its group dir."""
    from pipeline_lib.features import extract

    recipe = manifest.get("recipe") or {}
    if "combine" in recipe:  # a combined store: recompute its chunks from its sources
        from pipeline_lib.features.combine import repair_chunks

        return repair_chunks(path, manifest, chunks)
    attrs = json.loads(manifest["metadata_text"]["zarr.json"])["attributes"]
    if source is None:
        if not recipe:
            raise fstore.StoreError(
                f"{path}: the store records no recipe (it was not built by the workflow); "
                "repair it from Python with repair_store(path, source=...)"
            )
        source = _open_source(recipe)
    if backbone_options is None:
        backbone_options = recipe.get("backbone_options")
    settings = extract.ExtractionSettings.from_config(
        dict(
            recipe.get("extraction", {}),
            batch_size=int(attrs["batch_size"]),
            chunk_rows=int(attrs["chunk_rows"]),
            dtype=attrs["compute_dtype"],
        )
    )
    scratch = Path(f"{path}.repair")
    common = dict(
        backbone_name=recipe.get("backbone", attrs["backbone"]),
        out_path=scratch,
        image_size=int(attrs["image_size"]),
        settings=settings,
        backbone_options=backbone_options,
    )
    now = extract.init_store(source, **common)
    differ = fstore._settings_diff(attrs, now)
    if differ:
        shutil.rmtree(fstore.work_dir(scratch), ignore_errors=True)
        raise fstore.StoreError(
            f"{path}: cannot re-extract bit-identical chunks, the settings differ now "
            f"({differ.replace('in the work dir', 'in the store')}); rebuild it: "
            f"{fstore.rebuild_command(path)}"
        )
    extract.extract_shard(source, chunks=chunks, **common)
    return scratch, fstore._group_path(scratch)


def repair_store(
    path: str | os.PathLike, *, source=None, backbone_options: Mapping | None = None
) -> dict:
    """Repair the store at ``path`` in place; returns what was repaired.

    ``source`` (an ImageSource) and ``backbone_options`` default to the recipe
    recorded in the manifest. Raises StoreError when the store cannot be repaired
    bit-identically; nothing that fails its checksum is ever moved into the store.
    """
    path = Path(path)
    manifest = fstore._load_manifest(path, path)
    fstore.check_manifest_matches(path, path, manifest)
    metadata = [Path(e.path).relative_to(path).as_posix() for e in _metadata_faults(path, manifest)]
    for name in metadata:
        text = manifest["metadata_text"][name].encode()
        rec = manifest["metadata"][name]
        if integrity.digest_bytes(text) != rec["sha256"]:  # cannot happen: manifest is hashed
            raise fstore.StoreError(f"{path}: the manifest's copy of {name} is damaged")
        _replace_file(path / name, text)
        log.info("%s: restored %s from the manifest", path, name)
    damaged = sorted({e.chunk for e in _chunk_faults(path, manifest)})
    if damaged:
        scratch, group = _reextract(path, manifest, damaged, source, backbone_options)
        try:
            staged = {}
            for c in damaged:
                for a in ("features", "labels"):
                    rec = manifest["chunks"][c][a]
                    new = fstore._piece_record(group, rec["key"])
                    if (new["size"], new["sha256"]) != (rec["size"], rec["sha256"]):
                        raise fstore.StoreError(
                            f"{path}: chunk {c} re-extracted to other bytes than were stored "
                            f"({a}: sha256 {str(new['sha256'])[:12]}..., recorded "
                            f"{str(rec['sha256'])[:12]}...), e.g. on another number of devices "
                            f"or another code version; nothing was changed. Rebuild it: "
                            f"{fstore.rebuild_command(path)}"
                        )
                    staged[rec["key"]] = None if new["size"] is None else group / rec["key"]
            for key, src in staged.items():
                if src is None:
                    (path / key).unlink(missing_ok=True)
                else:
                    _replace_file(path / key, src.read_bytes())
        finally:
            shutil.rmtree(fstore.work_dir(scratch), ignore_errors=True)
        log.info("%s: re-extracted %s", path, fstore.describe_chunks(damaged, *_n_rows(manifest)))
    left = verify_store(path)
    if left:
        raise fstore.StoreError(f"{path}: still damaged after repair: {left[0]}")
    return {"metadata": metadata, "chunks": damaged}


def _n_rows(manifest: dict) -> tuple[int, int]:
    attrs = json.loads(manifest["metadata_text"]["zarr.json"])["attributes"]
    return int(attrs["num_examples"]), int(attrs["chunk_rows"])


def _describe_repair(store, done: dict) -> str:
    what = list(done["metadata"])
    if done["chunks"]:
        manifest = fstore._load_manifest(Path(store), store)
        what.append(fstore.describe_chunks(done["chunks"], *_n_rows(manifest)))
    return "repaired " + ", ".join(what) if what else "intact, nothing to repair"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_lib.features.verify",
        description="Check finished feature stores against their manifests; with --repair, "
        "re-extract damaged chunks in place (bit-identical) and restore damaged metadata.",
    )
    parser.add_argument(
        "stores", nargs="+", help="store paths, e.g. results/features/.../train.zarr"
    )
    parser.add_argument("--repair", action="store_true", help="repair damaged stores in place")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    status = 0
    for store in args.stores:
        try:
            if args.repair:
                print(f"{store}: {_describe_repair(store, repair_store(store))}")
            else:
                faults = verify_store(store)
                for e in faults:
                    print(e)
                print(f"{store}: {'DAMAGED' if faults else 'intact'}")
                status = status or int(bool(faults))
        except fstore.StoreError as exc:
            print(exc, file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
