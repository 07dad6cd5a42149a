"""Dataset sources: Fashion-MNIST from the Debian IDX files, with an opt-in TFDS fallback.

The default source is offline: the Debian package ``dataset-fashion-mnist``
installs the four gzipped IDX files under /usr/share/datasets/fashion-mnist.
Only when those files are absent *and* the caller allows the network does the
loader try TFDS. Files that are present but malformed are an error, never a
reason to fall back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline_lib.data.dataset import DatasetUnavailableError, ImageDataset
from pipeline_lib.data.idx import read_idx
from pipeline_lib.data.tfds_source import TfdsUnavailableError, read_tfds_split

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_NUM_CLASSES",
    "DatasetUnavailableError",
    "load_fashion_mnist",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NUM_CLASSES = 10
# Label i of Fashion-MNIST (the names of Xiao et al. 2017, as TFDS gives them).
FASHION_MNIST_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}  # our split -> IDX file prefix
_INSTALL_HINT = "apt-get install dataset-fashion-mnist"
_NETWORK_KEY = "allow_network: true"


def _check_max_examples(max_examples: int | None, where: str) -> None:
    if max_examples is None:
        return
    if isinstance(max_examples, bool) or not isinstance(max_examples, int | np.integer):
        raise TypeError(
            f"{where}: max_examples must be a positive int or None, got {max_examples!r}"
        )
    if max_examples <= 0:
        raise ValueError(f"{where}: max_examples must be > 0, got {max_examples}")


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    """The gzipped file if present, else the plain one, else None."""
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    return None


def _take_first(array: np.ndarray, max_examples: int | None, total: int, where: str) -> np.ndarray:
    if max_examples is None:
        return array
    if max_examples > total:
        raise ValueError(f"{where}: max_examples={max_examples} but the split has {total} examples")
    return array[:max_examples].copy()  # a copy, so the rest of the file's data is freed


def _load_fashion_mnist_idx(
    images_path: Path, labels_path: Path, split: str, max_examples: int | None
) -> ImageDataset:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, H, W), "
            f"got {images.dtype}{list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels of shape (N,), "
            f"got {labels.dtype}{list(labels.shape)}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"fashion_mnist/{split}: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels; counts must match"
        )
    bad = np.flatnonzero(labels >= FASHION_MNIST_NUM_CLASSES)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{labels_path}: {bad.size} labels outside [0, {FASHION_MNIST_NUM_CLASSES}), "
            f"first at index {i} with value {int(labels[i])}"
        )
    where = f"fashion_mnist/{split}"
    total = images.shape[0]
    return ImageDataset(
        images=_take_first(images, max_examples, total, where),
        labels=_take_first(labels, max_examples, total, where).astype(np.int32),
        num_classes=FASHION_MNIST_NUM_CLASSES,
        class_names=FASHION_MNIST_CLASS_NAMES,
        name="fashion_mnist",
        split=split,
        source=f"{images_path}, {labels_path}",
    )


def _load_fashion_mnist_tfds(
    split: str, max_examples: int | None, tfds_data_dir: str | None
) -> ImageDataset:
    images, labels, _ = read_tfds_split(
        "fashion_mnist", split, data_dir=tfds_data_dir, max_examples=max_examples
    )
    # TFDS keeps a channel axis; the IDX files do not.
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"tfds:fashion_mnist/{split}: expected uint8 images of shape (N, H, W[, 1]), "
            f"got {images.dtype}{list(images.shape)}"
        )
    return ImageDataset(
        images=np.ascontiguousarray(images),
        labels=labels.astype(np.int32),
        num_classes=FASHION_MNIST_NUM_CLASSES,
        class_names=FASHION_MNIST_CLASS_NAMES,
        name="fashion_mnist",
        split=split,
        source="tfds:fashion_mnist",
    )


def load_fashion_mnist(
    split: str,
    *,
    data_dir: str | os.PathLike = DEFAULT_FASHION_MNIST_DIR,
    allow_network: bool = False,
    max_examples: int | None = None,
    tfds_data_dir: str | None = None,
) -> ImageDataset:
    """Load one Fashion-MNIST split: 28x28 grey uint8 images, int32 labels in [0, 10).

    Args:
      split: "train" (60,000 examples, files train-*) or "test" (10,000, files t10k-*).
      data_dir: folder holding the IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
        gzipped (preferred) or plain.
      allow_network: when the IDX files are absent, try TFDS ``fashion_mnist``
        (which may download). Off by default: the default run is offline.
      max_examples: keep only the first n examples, a public and deterministic subset.
      tfds_data_dir: TFDS data folder for the fallback (None: the TFDS default).

    Raises:
      DatasetUnavailableError (a FileNotFoundError): the files are absent and TFDS
        is not allowed or failed; the message names the missing paths and the remedies.
      IdxFormatError: a file is present but malformed.
      ValueError: bad arguments, or files whose contents disagree (counts, labels, shapes).
    """
    if split not in _FASHION_MNIST_PREFIX:
        raise ValueError(
            f"fashion_mnist: unknown split {split!r}; choose one of {sorted(_FASHION_MNIST_PREFIX)}"
        )
    where = f"fashion_mnist/{split}"
    _check_max_examples(max_examples, where)

    data_dir = Path(data_dir)
    prefix = _FASHION_MNIST_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_idx(data_dir, stem) for stem in stems]
    if found[0] is not None and found[1] is not None:
        return _load_fashion_mnist_idx(found[0], found[1], split, max_examples)

    missing = ", ".join(
        str(data_dir / f"{stem}.gz")
        for stem, path in zip(stems, found, strict=True)
        if path is None
    )
    install = (
        f"install the Debian package ({_INSTALL_HINT}) or point data_dir at a folder "
        "holding the Fashion-MNIST IDX files"
    )
    if not allow_network:
        raise DatasetUnavailableError(
            f"{where}: IDX file(s) not found: {missing}. To fix: {install}; "
            f"or set `{_NETWORK_KEY}` in the config to let TFDS fetch 'fashion_mnist'."
        )
    try:
        return _load_fashion_mnist_tfds(split, max_examples, tfds_data_dir)
    except TfdsUnavailableError as exc:
        raise DatasetUnavailableError(
            f"{where}: IDX file(s) not found: {missing}, and the TFDS fallback "
            f"(allowed by `{_NETWORK_KEY}`) failed: {exc}. To fix: {install}; or install "
            "tensorflow-datasets with tensorflow and network access once to prepare "
            "'fashion_mnist' in the array_record format."
        ) from exc
