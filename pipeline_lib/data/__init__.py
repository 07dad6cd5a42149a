"""Dataset sources, all returning :class:`ImageDataset`.

``load_dataset(name, split, ...)`` is the one entry point the workflow uses. It
dispatches on the dataset name through a small registry, so that new sources
(generic TFDS datasets, image folders) are added with :func:`register_dataset`
without touching callers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from pipeline_lib.data.dataset import ImageDataset, ImageSource
from pipeline_lib.data.idx import IdxFormatError, read_idx
from pipeline_lib.data.sources import (
    DEFAULT_FASHION_MNIST_DIR,
    DatasetUnavailableError,
    load_fashion_mnist,
)

__all__ = [
    "DatasetLoader",
    "DatasetUnavailableError",
    "IdxFormatError",
    "ImageDataset",
    "ImageSource",
    "known_datasets",
    "load_dataset",
    "load_fashion_mnist",
    "open_dataset",
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


def open_dataset(name: str, spec: Mapping, split: str) -> ImageSource:
    """Open split ``split`` of the dataset that config entry ``datasets.<name>`` describes.

    ``spec`` is that entry (a mapping with at least ``source``). The result reads
    rows lazily where the source allows it; ``name`` becomes its ``name``.

    Raises:
      ValueError: unknown source or split, or bad options (the message names ``datasets.<name>``).
      DatasetUnavailableError: the data is not available from any allowed source.
    """
    where = f"datasets.{name}"
    source = spec.get("source")
    if source not in _LOADERS:
        raise ValueError(f"{where}.source={source!r}: unknown; known sources: {known_datasets()}")
    limit = spec.get(f"max_{split}_examples")
    data = load_dataset(
        source,
        split,
        data_dir=spec.get("data_dir"),
        allow_network=bool(spec.get("allow_network", False)),
        max_examples=None if limit is None else int(limit),
    )
    return data
