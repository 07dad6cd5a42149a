"""Dataset sources.

:func:`open_dataset` is the entry point for extraction: it opens one split of
a ``datasets.<key>`` config entry as an :class:`ImageSource`, dispatching on
its ``source``:

- ``fashion_mnist``: the Debian IDX files (in memory; 60k small images);
- ``tfds``: any prepared TFDS dataset, read lazily without TensorFlow;
- ``image_folder``: ``<path>/<split>/<class>/<image>``, decoded lazily.

:func:`load_dataset` is the older in-memory loader by dataset name, with a
small registry (:func:`register_dataset`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Protocol

from pipeline_lib.data import spec as specs
from pipeline_lib.data.dataset import DatasetUnavailableError, ImageDataset, ImageSource
from pipeline_lib.data.idx import IdxFormatError, read_idx
from pipeline_lib.data.image_folder import (
    IMAGE_FOLDER_KEYS,
    ImageDecodeError,
    ImageFolderSource,
    open_image_folder,
)
from pipeline_lib.data.sources import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist
from pipeline_lib.data.tfds_source import TFDS_KEYS, TfdsSource, open_tfds

__all__ = [
    "SOURCES",
    "DatasetLoader",
    "DatasetUnavailableError",
    "IdxFormatError",
    "ImageDataset",
    "ImageDecodeError",
    "ImageFolderSource",
    "ImageSource",
    "TfdsSource",
    "known_datasets",
    "load_dataset",
    "load_fashion_mnist",
    "open_dataset",
    "open_image_folder",
    "open_tfds",
    "read_idx",
    "register_dataset",
]


class DatasetLoader(Protocol):
    """Loads one split; ``data_dir=None`` means the source's own default location."""

    def __call__(
        self,
        split: str,
        *,
        data_dir: str | None,
        allow_network: bool,
        max_examples: int | None,
    ) -> ImageDataset: ...


def _fashion_mnist(
    split: str, *, data_dir: str | None, allow_network: bool, max_examples: int | None
) -> ImageDataset:
    return load_fashion_mnist(
        split,
        data_dir=DEFAULT_FASHION_MNIST_DIR if data_dir is None else data_dir,
        allow_network=allow_network,
        max_examples=max_examples,
    )


_LOADERS: dict[str, DatasetLoader] = {"fashion_mnist": _fashion_mnist}


def register_dataset(name: str, loader: DatasetLoader) -> None:
    """Make ``load_dataset(name, ...)`` call ``loader``. Names are unique."""
    if name in _LOADERS:
        raise ValueError(f"dataset {name!r} is already registered")
    _LOADERS[name] = loader


def known_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    allow_network: bool = False,
    max_examples: int | None = None,
) -> ImageDataset:
    """Load split ``split`` of dataset ``name``.

    Args:
      name: a registered dataset name (see :func:`known_datasets`), e.g. "fashion_mnist".
      split: the split, e.g. "train" or "test".
      data_dir: where the source looks for local files; None means its default.
      allow_network: whether the source may fetch data it does not find locally.
      max_examples: keep only the first n examples (a public, deterministic subset).

    Raises:
      ValueError: unknown dataset name (the message lists the known ones), or bad data.
      DatasetUnavailableError: the data is not available from any allowed source.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    return loader(
        split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        allow_network=allow_network,
        max_examples=max_examples,
    )


FASHION_MNIST_KEYS = (
    "source",
    "data_dir",
    "allow_network",
    "max_train_examples",
    "max_test_examples",
)


def _open_fashion_mnist(name: str, spec: Mapping, split: str) -> ImageDataset:
    where = f"datasets.{name}"
    specs.check_keys(where, spec, FASHION_MNIST_KEYS, "fashion_mnist")
    specs.check_split(where, split)
    data = load_dataset(
        "fashion_mnist",
        split,
        data_dir=specs.optional_str(where, spec, "data_dir", None),
        allow_network=specs.optional_bool(where, spec, "allow_network"),
        max_examples=specs.max_examples(where, spec, split),
    )
    return dataclasses.replace(data, name=name)


# source -> (opener, the options it accepts)
SOURCES: dict[str, tuple[Callable[[str, Mapping, str], ImageSource], tuple[str, ...]]] = {
    "fashion_mnist": (_open_fashion_mnist, FASHION_MNIST_KEYS),
    "tfds": (open_tfds, TFDS_KEYS),
    "image_folder": (open_image_folder, IMAGE_FOLDER_KEYS),
}


def open_dataset(name: str, spec: Mapping, split: str) -> ImageSource:
    """Open split ``split`` of the dataset that config entry ``datasets.<name>`` describes.

    ``spec`` is that entry: a mapping with ``source`` (fashion_mnist, tfds or
    image_folder) and that source's options (see pipeline_lib/schemas/config.schema.yaml).
    The result's ``name`` is ``name``. TFDS and image-folder sources read rows
    lazily, so a split never has to fit in memory; ``read`` may be called from a
    background thread (one reader at a time).

    Raises:
      ValueError, TypeError: unknown source or split, or bad options; the message
        names ``datasets.<name>.<option>``.
      DatasetUnavailableError: the data is not available from any allowed source.
    """
    where = f"datasets.{name}"
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where}: must be a mapping with at least 'source', got {spec!r}")
    source = spec.get("source")
    if source not in SOURCES:
        raise ValueError(
            f"{where}.source={source!r}: unknown source; choose one of {', '.join(SOURCES)}"
        )
    opener, _ = SOURCES[source]
    return opener(name, spec, split)
