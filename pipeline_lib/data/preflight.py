"""Plan-time checks of a ``datasets.<key>`` entry, before any job is queued.

Two questions, answered without decoding a single image:

- :func:`check_available`: is the data where the entry says? A missing folder or
  file raises :class:`~pipeline_lib.data.dataset.DatasetUnavailableError` naming the
  key and the path, with the remedies that apply to that source only (the
  ``allow_network`` hint only for sources that can download: fashion_mnist and tfds).
- :func:`cheap_num_train`: N of the training split, when it can be read cheaply
  (IDX headers, TFDS's ``dataset_info.json``, a folder listing), so that
  delta >= 1/N is caught when the run is planned. None when it cannot.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline_lib.data.dataset import DatasetUnavailableError
from pipeline_lib.data.sources import DEFAULT_FASHION_MNIST_DIR

__all__ = ["check_available", "cheap_num_train", "idx_num_items"]

_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip
_GZIP_MAGIC = b"\x1f\x8b"


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path))


def _fmnist_dir(spec: Mapping) -> Path:
    return _expand(spec.get("data_dir") or DEFAULT_FASHION_MNIST_DIR)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _tfds_dir(spec: Mapping) -> Path:
    given = spec.get("data_dir")
    if given:
        return _expand(given)
    return _expand(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def check_available(name: str, spec: Mapping) -> None:
    """Raise DatasetUnavailableError if the entry's local data is missing (see module doc)."""
    where = f"datasets.{name}"
    source = spec.get("source")
    network = bool(spec.get("allow_network"))
    if source == "fashion_mnist":
        folder = _fmnist_dir(spec)
        missing = [stem for stem in _FMNIST_FILES if _find(folder, stem) is None]
        if missing and not network:
            key = "data_dir" if spec.get("data_dir") else "data_dir (default)"
            raise DatasetUnavailableError(
                f"{where}.{key}: {folder} does not hold the Fashion-MNIST IDX files "
                f"(missing {', '.join(f'{m}.gz' for m in missing)}). Install them with "
                "`apt-get install dataset-fashion-mnist`, point "
                f"{where}.data_dir at a folder that holds them, or set "
                f"{where}.allow_network: true to fall back to TFDS (needs the network)"
            )
    elif source == "tfds" and spec.get("data_dir"):  # TFDS's own default is TFDS's business
        folder = _tfds_dir(spec)
        tfds_name = str(spec.get("tfds_name") or name).split(":")[0]
        if not (folder / tfds_name).is_dir() and not network:
            raise DatasetUnavailableError(
                f"{where}.data_dir: TFDS dataset {tfds_name!r} is not prepared in {folder} "
                f"(no folder {folder / tfds_name}). Prepare it once where TensorFlow and the "
                f"network are available (`tfds build {tfds_name} --data_dir={folder} "
                f"--file_format=array_record`), point {where}.data_dir at the folder that "
                f"holds it, or set {where}.allow_network: true to let TFDS download and "
                "prepare it here (needs tensorflow)"
            )
    elif source == "image_folder":
        path = spec.get("path")
        if path and not _expand(str(path)).is_dir():
            raise DatasetUnavailableError(
                f"{where}.path: folder {_expand(str(path))} does not exist; point it at the "
                "dataset root, which holds one sub-folder per split, each with one sub-folder "
                "per class (an image folder is always local: it is never downloaded)"
            )


def idx_num_items(path: str | os.PathLike) -> int:
    """The first dimension of an IDX file (gzipped or plain), from its header alone."""
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if is_gzip else raw
        header = stream.read(8)
    if len(header) < 8 or header[:2] != b"\0\0" or header[3] == 0:
        raise ValueError(f"{os.fspath(path)}: not an IDX file (bad header {header.hex()})")
    return int(np.frombuffer(header[4:8], dtype=">u4")[0])


def _tfds_num_examples(spec: Mapping, name: str) -> int | None:
    """N of the train split from the prepared dataset's dataset_info.json, if plain."""
    split = (spec.get("splits") or {}).get("train", "train")
    if not split.isidentifier():  # "train[:90%]", "train+validation": leave it to the job
        return None
    tfds_name, _, version = str(spec.get("tfds_name") or name).partition(":")
    root = _tfds_dir(spec) / tfds_name
    infos = [p for p in root.glob("*/dataset_info.json")] + list(root.glob("*/*/dataset_info.json"))
    if version:
        infos = [p for p in infos if p.parent.name == version]
    if len(infos) != 1:  # none, or several versions/configs: the job decides
        return None
    try:
        info = json.loads(infos[0].read_text())
        for entry in info.get("splits", []):
            if entry.get("name") == split:
                return int(sum(int(n) for n in entry.get("shardLengths", [])))
    except (OSError, ValueError, TypeError):
        return None
    return None


def cheap_num_train(name: str, spec: Mapping) -> int | None:
    """N of the training split (after ``max_train_examples``) when cheap to read, else None.

    Raises ValueError for an image folder whose layout is wrong (the same error the
    extraction job would raise, only earlier).
    """
    source = spec.get("source")
    limit = spec.get("max_train_examples")
    total: int | None = None
    if source == "fashion_mnist":
        labels = _find(_fmnist_dir(spec), "train-labels-idx1-ubyte")
        if labels is not None:
            try:
                total = idx_num_items(labels)
            except (OSError, ValueError, EOFError):
                total = None  # the extraction job reports a damaged file in full
    elif source == "tfds":
        total = _tfds_num_examples(spec, name)
    elif source == "image_folder":
        from pipeline_lib.data.image_folder import open_image_folder

        return open_image_folder(name, spec, "train").num_examples  # applies the limit
    if total is None:
        return int(limit) if limit else None
    return min(total, int(limit)) if limit else total
