"""The in-memory labelled image set that every data source returns."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

__all__ = [
    "DatasetUnavailableError",
    "ImageDataset",
    "ImageSource",
    "check_image",
    "check_row_range",
    "default_decode_threads",
    "map_in_threads",
    "stack_if_uniform",
]

_T = TypeVar("_T")
_R = TypeVar("_R")


class DatasetUnavailableError(FileNotFoundError):
    """The data is not on this machine and no allowed source could provide it."""


@runtime_checkable
class ImageSource(Protocol):
    """Labelled images of one split, read lazily by row range.

    Extraction only ever asks for contiguous row ranges, so sources that do not
    fit in memory (ImageNet from TFDS, image folders) decode on demand, and
    shard jobs read only their own rows. Row order is fixed and public.

    Attributes:
      name: the dataset key from the config, e.g. "fashion_mnist".
      split: the split name, "train" or "test".
      source: where the data comes from, for logs and store attributes.
      num_examples: the number of rows N.
      num_classes: the number of classes K of the task.
    """

    name: str
    split: str
    source: str

    @property
    def num_examples(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    def read(self, start: int, stop: int) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Rows [start, stop): (images, labels int32 (n,)).

        Images are uint8, (H, W) or (H, W, C) each; a stacked (n, H, W[, C]) array
        when every image has the same shape, otherwise a list of arrays.
        """
        ...


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """Labelled images of one split, checked on construction.

    Attributes:
      images: uint8, shape (N, H, W) for grey images or (N, H, W, C).
      labels: int32, shape (N,), each in [0, num_classes).
      num_classes: the number of classes K of the task (not just those present).
      name: the dataset name, e.g. "fashion_mnist".
      split: the split name, e.g. "train" or "test".
      source: where the data came from (file paths, or "tfds:<name>").
      class_names: the name of each class, label i is class_names[i]; None if unknown.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str
    source: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = f"{self.name}/{self.split} (from {self.source})"
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray):
            raise TypeError(f"{where}: images must be a numpy array, got {type(images).__name__}")
        if not isinstance(labels, np.ndarray):
            raise TypeError(f"{where}: labels must be a numpy array, got {type(labels).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"{where}: images must be uint8, got {images.dtype}")
        if images.ndim not in (3, 4):
            raise ValueError(
                f"{where}: images must have shape (N, H, W) or (N, H, W, C), got {images.shape}"
            )
        if 0 in images.shape[1:]:
            raise ValueError(f"{where}: images have an empty dimension: shape {images.shape}")
        if labels.dtype != np.int32:
            raise ValueError(
                f"{where}: labels must be int32, got {labels.dtype} "
                "(convert with .astype(np.int32))"
            )
        if labels.ndim != 1:
            raise ValueError(f"{where}: labels must have shape (N,), got {labels.shape}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
            raise TypeError(f"{where}: num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise ValueError(f"{where}: num_classes must be at least 1, got {self.num_classes}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if len(names) != self.num_classes:
                raise ValueError(
                    f"{where}: {len(names)} class names for {self.num_classes} classes"
                )
            object.__setattr__(self, "class_names", names)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{where}: {images.shape[0]} images but {labels.shape[0]} labels; counts must match"
            )
        if images.shape[0] == 0:
            raise ValueError(f"{where}: the dataset has no examples")
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{where}: {bad.size} labels outside [0, {self.num_classes}), "
                f"first at index {i} with value {int(labels[i])}"
            )

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) as (images, labels); see :class:`ImageSource`."""
        n = self.num_examples
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{self.name}/{self.split}: rows [{start}, {stop}) outside [0, {n})")
        return self.images[start:stop], self.labels[start:stop]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image: (H, W) or (H, W, C)."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, "
            f"images={self.images.dtype}{list(self.images.shape)}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


def check_row_range(start: int, stop: int, num_examples: int, where: str) -> tuple[int, int]:
    """Return (start, stop) as ints if 0 <= start <= stop <= num_examples, else raise IndexError."""
    for value in (start, stop):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{where}: row bounds must be ints, got {value!r}")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= num_examples:
        raise IndexError(f"{where}: rows [{start}, {stop}) outside [0, {num_examples})")
    return start, stop


def check_image(image: np.ndarray, where: str) -> np.ndarray:
    """Check one decoded image: uint8, (H, W), (H, W, 1) or (H, W, 3), no empty dimension."""
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
        raise ValueError(
            f"{where}: images must have shape (H, W), (H, W, 1) or (H, W, 3), got {image.shape}"
        )
    if 0 in image.shape:
        raise ValueError(f"{where}: the image has an empty dimension: shape {image.shape}")
    return image


def stack_if_uniform(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One (n, H, W[, C]) array when every image has the same shape, else the list itself."""
    if images and all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    return images


def default_decode_threads() -> int:
    """Threads for decoding images in one read: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def map_in_threads(function: Callable[[_T], _R], items: Sequence[_T], threads: int) -> list[_R]:
    """``[function(x) for x in items]``, in order, using up to ``threads`` threads.

    Image decoders (PIL) release the GIL, so threads speed up decoding a batch.
    The first exception raised by ``function`` (in item order) propagates.
    """
    if threads <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(function, items))
