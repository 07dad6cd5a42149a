"""Read a TFDS image classification split into numpy arrays, without TensorFlow.

``tfds.data_source`` gives random access to data prepared in the array_record
format and decodes images with numpy/PIL, so it works without TensorFlow.
Downloading and preparing an image dataset does need TensorFlow (and the
network); callers decide whether they may try that at all.

TFDS stores examples in its own (hashed) order, so "the first n examples" of a
TFDS split is a different public subset from the first n of the original files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["TfdsUnavailableError", "read_tfds_split"]


class TfdsUnavailableError(RuntimeError):
    """TFDS could not provide the split (not installed, not prepared, no network, ...)."""


def read_tfds_split(
    tfds_name: str,
    split: str,
    *,
    data_dir: str | None = None,
    max_examples: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Return (images uint8 (N, ...), labels int64 (N,), num_classes or None).

    Takes the first ``max_examples`` records of the split in TFDS order when given.

    Raises:
      TfdsUnavailableError: TFDS is not importable or cannot open the split; the
        original exception is chained and its text included.
      ValueError: the split is smaller than ``max_examples``, or records are malformed.
    """
    where = f"tfds:{tfds_name}/{split}"
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise TfdsUnavailableError(
            f"{where}: tensorflow-datasets is not installed ({exc})"
        ) from exc
    try:
        source: Any = tfds.data_source(tfds_name, split=split, data_dir=data_dir)
        total = len(source)
    except Exception as exc:  # TFDS raises many types here; all mean "not available"
        raise TfdsUnavailableError(f"{where}: {type(exc).__name__}: {exc}") from exc

    count = total if max_examples is None else max_examples
    if count > total:
        raise ValueError(f"{where}: max_examples={max_examples} but the split has {total} examples")
    if count == 0:
        raise ValueError(f"{where}: the split has no examples")

    images: np.ndarray | None = None
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):  # item by item: __getitems__ is not reliable across TFDS versions
        record = source[i]
        try:
            image = np.asarray(record[image_key])
            label = record[label_key]
        except KeyError as exc:
            raise ValueError(
                f"{where}: record {i} has no key {exc}; keys are {sorted(record)}"
            ) from exc
        if images is None:
            images = np.empty((count, *image.shape), dtype=image.dtype)
        if image.shape != images.shape[1:] or image.dtype != images.dtype:
            raise ValueError(
                f"{where}: record {i} has image {image.dtype}{list(image.shape)}, "
                f"expected {images.dtype}{list(images.shape[1:])} like record 0"
            )
        images[i] = image
        labels[i] = int(label)
    assert images is not None

    num_classes: int | None = None
    try:
        num_classes = int(source.dataset_info.features[label_key].num_classes)
    except Exception:  # metadata is optional; callers may know K
        num_classes = None
    return images, labels, num_classes
