"""Labelled images from a local folder tree: ``<path>/<split folder>/<class>/<image file>``.

Class names are the sub-folders of the *train* split folder, sorted, and the
same class indices are used for every split; a test class that train lacks is
an error. Rows are in class order, then file name order (names sort by code
point, so upper case comes first), so the order is fixed and public. Listing
the tree is cheap; files are decoded with PIL only when
:meth:`ImageFolderSource.read` asks for their rows, and every image becomes RGB
uint8 (grey, palette, RGBA and 16-bit images are converted).

``max_<split>_examples: n`` keeps a class-balanced public subset: the first n
files of a round robin over the classes (the first file of every class, then
the second, ...), still in class-then-file-name row order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline_lib.data import spec as specs
from pipeline_lib.data.dataset import (
    DatasetUnavailableError,
    check_row_range,
    default_decode_threads,
    map_in_threads,
    stack_if_uniform,
)

__all__ = [
    "DEFAULT_EXTENSIONS",
    "IMAGE_FOLDER_KEYS",
    "ImageDecodeError",
    "ImageFolderSource",
    "decode_image_file",
    "open_image_folder",
]

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff")
# The options of a `source: image_folder` entry under `datasets:` in config/config.yaml.
IMAGE_FOLDER_KEYS = (
    "source",
    "path",
    "splits",
    "extensions",
    "max_train_examples",
    "max_test_examples",
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageDecodeError(ValueError):
    """An image file could not be decoded. The message names the file."""


def decode_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file to an RGB uint8 array of shape (H, W, 3).

    Grey, palette and RGBA images are converted (alpha is dropped, not blended);
    16-bit grey images are scaled to 8 bits. Animated images give their first frame.

    Raises:
      ImageDecodeError: the file is unreadable, truncated or not an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _SIXTEEN_BIT_MODES:
                grey = np.asarray(image, dtype=np.int64)
                grey = np.clip(grey >> 8 if grey.max(initial=0) > 255 else grey, 0, 255)
                return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
            if image.mode == "P":
                image = image.convert("RGBA")  # keeps palette transparency well defined
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError, ...
        raise ImageDecodeError(
            f"{os.fspath(path)}: cannot decode the image ({type(exc).__name__}: {exc}); "
            "replace or remove the file"
        ) from exc
    if rgb.ndim != 3 or 0 in rgb.shape:
        raise ImageDecodeError(f"{os.fspath(path)}: decoded to an empty image, shape {rgb.shape}")
    return rgb


def _decode(path: str) -> np.ndarray:
    return decode_image_file(path)  # looked up at call time, so tests can count calls


class ImageFolderSource:
    """One split of an image-folder dataset; files are decoded on demand.

    Attributes:
      name: the dataset key in the config.
      split: our split name, "train" or "test".
      source: "image_folder:<split folder>".
      folder: the split folder.
      class_names: the class folder names, sorted; label i is class_names[i].
      files: the image paths (str), one per row, in row order.
      labels: int32 (N,), one per row.
      decode_threads: threads that decode the files of one read (default: CPUs, at most 8).
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        folder: Path,
        class_names: Sequence[str],
        files: Sequence[str],
        labels: np.ndarray,
    ) -> None:
        self.name = name
        self.split = split
        self.folder = folder
        self.source = f"image_folder:{folder}"
        self.class_names = tuple(class_names)
        self.files = tuple(files)
        self.labels = labels
        self.decode_threads = default_decode_threads()
        self._lock = threading.Lock()

    @property
    def num_examples(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read(self, start: int, stop: int) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Rows [start, stop): (RGB uint8 images, labels int32); decodes only those files."""
        where = f"datasets.{self.name} ({self.split}, {self.folder})"
        start, stop = check_row_range(start, stop, self.num_examples, where)
        with self._lock:
            images = map_in_threads(_decode, self.files[start:stop], self.decode_threads)
        return stack_if_uniform(images), self.labels[start:stop].copy()

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(name={self.name!r}, split={self.split!r}, "
            f"folder={str(self.folder)!r}, num_examples={self.num_examples}, "
            f"num_classes={self.num_classes})"
        )


def _extensions(where: str, spec: Mapping) -> frozenset[str]:
    value = spec.get("extensions")
    if value is None:
        return frozenset(DEFAULT_EXTENSIONS)
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise TypeError(
            f"{where}.extensions: must be a non-empty list like [jpg, png], got {value!r}"
        )
    result = set()
    for item in value:
        if not isinstance(item, str) or not item.strip(". "):
            raise TypeError(f"{where}.extensions: each must be a file extension, got {item!r}")
        result.add(item.strip(". ").lower())
    return frozenset(result)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _class_folders(folder: Path, where: str, extensions: frozenset[str]) -> list[str]:
    """Sorted class folder names under a split folder; image files there are an error."""
    names = []
    for entry in sorted(folder.iterdir()):
        if _is_hidden(entry):
            continue
        if entry.is_dir():
            names.append(entry.name)
        elif _extension(entry.name) in extensions:
            raise ValueError(
                f"{where}: {entry} is an image directly in the split folder; "
                "put every image in a sub-folder named after its class"
            )
    return names


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower().lstrip(".")


def _class_files(folder: Path, where: str, extensions: frozenset[str]) -> list[str]:
    """The image file paths of one class folder, sorted by file name.

    Uses os.scandir, whose entries know whether they are folders without a stat
    call per file: listing ImageNet's 1.28 M files stays quick on shared storage.
    """
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        names = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                raise ValueError(
                    f"{where}: {entry.path} is a folder inside class folder {folder}; images "
                    "must sit directly in their class folder (nested folders are not read)"
                )
            if _extension(entry.name) in extensions:
                names.append(entry.name)
    if not names:
        raise ValueError(
            f"{where}: class folder {folder} holds no image files "
            f"(extensions {', '.join(sorted(extensions))}); add images or remove the folder"
        )
    prefix = os.fspath(folder)
    return [os.path.join(prefix, name) for name in sorted(names)]


def _round_robin_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """Row indices of the first ``limit`` rows in a round robin over classes, sorted.

    ``labels`` is sorted (class order), so a row's rank within its class is its
    index minus the first index of its class.
    """
    first_of_class = np.searchsorted(labels, labels, side="left")
    rank_in_class = np.arange(labels.size) - first_of_class
    order = np.lexsort((labels, rank_in_class))  # by rank, then class
    return np.sort(order[:limit])


def open_image_folder(name: str, spec: Mapping, split: str) -> ImageFolderSource:
    """Open split ``split`` of the ``source: image_folder`` entry ``datasets.<name>``.

    Spec keys: path (root folder; required), splits (our split -> sub-folder of path;
    default train -> "train", test -> "test"), extensions (default jpg, jpeg, png, bmp,
    gif, webp, tif, tiff; case-insensitive; other files and hidden files are skipped),
    max_train_examples / max_test_examples (a class-balanced public subset, see the
    module docstring).

    Raises:
      DatasetUnavailableError: the root or split folder is missing.
      ValueError, TypeError: a bad spec or folder layout (no classes, an empty class
        folder, a test class that train lacks, ...); the message names the folder.
    """
    where = f"datasets.{name}"
    specs.check_keys(where, spec, IMAGE_FOLDER_KEYS, "image_folder")
    specs.check_split(where, split)
    path = specs.optional_str(where, spec, "path", None)
    if path is None:
        raise ValueError(f"{where}.path: required for source 'image_folder' (the root folder)")
    root = Path(os.path.expanduser(path))
    sub_folders = specs.split_mapping(where, spec, {s: s for s in specs.SPLITS})
    extensions = _extensions(where, spec)
    limit = specs.max_examples(where, spec, split)
    if not root.is_dir():
        raise DatasetUnavailableError(
            f"{where}.path: folder {root} does not exist; point it at the dataset root, "
            f"which holds one folder per split ({', '.join(sorted(set(sub_folders.values())))})"
        )

    def split_folder(ours: str) -> Path:
        folder = root / sub_folders[ours]
        if not folder.is_dir():
            raise DatasetUnavailableError(
                f"{where}.splits.{ours}: split folder {folder} does not exist; create it or "
                f"set {where}.splits.{ours} to the sub-folder of {root} that holds the {ours} split"
            )
        return folder

    train_folder = split_folder("train")
    class_names = _class_folders(train_folder, f"{where} (train)", extensions)
    if not class_names:
        raise ValueError(
            f"{where}: the train folder {train_folder} has no class sub-folders; "
            "put the images of each class in a sub-folder named after the class"
        )
    folder = split_folder(split)
    if split != "train":
        unknown = sorted(
            set(_class_folders(folder, f"{where} ({split})", extensions)) - set(class_names)
        )
        if unknown:
            raise ValueError(
                f"{where} ({split}): class folder(s) {', '.join(str(folder / c) for c in unknown)} "
                f"have no counterpart in the train folder {train_folder}; the classes are "
                "those of the train split"
            )

    files: list[str] = []
    labels: list[np.ndarray] = []
    for label, class_name in enumerate(class_names):
        class_files = _class_files(folder / class_name, f"{where} ({split})", extensions)
        files.extend(class_files)
        labels.append(np.full(len(class_files), label, dtype=np.int32))
    if not files:
        raise ValueError(
            f"{where} ({split}): the split folder {folder} has no images in any class folder "
            f"({', '.join(class_names)})"
        )
    all_labels = np.concatenate(labels)
    if limit is not None:
        if limit > len(files):
            raise ValueError(
                f"{where}.max_{split}_examples={limit}: but {folder} holds {len(files)} images"
            )
        keep = _round_robin_subset(all_labels, limit)
        files = [files[i] for i in keep]
        all_labels = all_labels[keep]
    return ImageFolderSource(
        name=name,
        split=split,
        folder=folder,
        class_names=class_names,
        files=files,
        labels=all_labels,
    )
