"""TFDS image classification splits, read lazily and without TensorFlow.

``tfds.data_source`` gives random access to data prepared in the array_record
format and decodes images with numpy/PIL, so it works without TensorFlow.
Downloading and preparing an image dataset does need TensorFlow (and the
network); callers decide whether they may try that at all.

:func:`open_tfds` is the ``source: tfds`` reader behind ``open_dataset``: it
opens the split and reads only the records a caller asks for.
:func:`read_tfds_split` materialises a (small) split, for the Fashion-MNIST
fallback.

TFDS stores examples in its own (hashed) order, so "the first n examples" of a
TFDS split is a different public subset from the first n of the original files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline_lib.data import spec as specs
from pipeline_lib.data.dataset import (
    DatasetUnavailableError,
    check_image,
    check_row_range,
    default_decode_threads,
    map_in_threads,
    stack_if_uniform,
)

__all__ = ["TFDS_KEYS", "TfdsSource", "TfdsUnavailableError", "open_tfds", "read_tfds_split"]

# The options of a `source: tfds` entry under `datasets:` in config/config.yaml.
TFDS_KEYS = (
    "source",
    "tfds_name",
    "data_dir",
    "splits",
    "image_key",
    "label_key",
    "num_classes",
    "allow_network",
    "max_train_examples",
    "max_test_examples",
)
_MAX_ERROR_CHARS = 600  # TFDS errors can list every dataset in its catalog


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


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " [...]"


class TfdsSource:
    """One split of a prepared TFDS dataset, read record by record on demand.

    Rows are the first ``num_examples`` records of the TFDS split, in TFDS's own
    (fixed, public) order. Nothing is decoded until :meth:`read` asks for it, so
    ImageNet-sized splits never sit in memory. Reads hold a lock, so one source
    may be read from a background thread.

    Attributes:
      name: the dataset key in the config.
      split: our split name, "train" or "test".
      source: "tfds:<tfds_name>/<tfds split>" and the data dir, for logs and store attributes.
      tfds_name, tfds_split, data_dir, image_key, label_key: where the records come from.
      decode_threads: threads that fetch and decode the records of one read (default:
        CPUs, at most 8); TFDS's array_record reader is thread-safe.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        tfds_name: str,
        tfds_split: str,
        data_dir: str | None,
        records: Any,
        num_examples: int,
        num_classes: int,
        image_key: str = "image",
        label_key: str = "label",
        image_shape: tuple[int, ...] | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        if image_shape is not None:
            # One fixed shape for every record (e.g. cifar10): the extractor resizes on
            # the device; without it (e.g. imagenet2012) every batch is resized on the host.
            self.image_shape = tuple(int(n) for n in image_shape)
        self.name = name
        self.split = split
        self.tfds_name = tfds_name
        self.tfds_split = tfds_split
        self.data_dir = data_dir
        self.image_key = image_key
        self.label_key = label_key
        self.source = f"tfds:{tfds_name}/{tfds_split}" + (f" in {data_dir}" if data_dir else "")
        self._records = records
        self._num_examples = int(num_examples)
        self._num_classes = int(num_classes)
        self.class_names = tuple(class_names) if class_names else None
        self.decode_threads = default_decode_threads()
        self._lock = threading.Lock()

    @property
    def num_examples(self) -> int:
        return self._num_examples

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _where(self, index: int | None = None) -> str:
        row = "" if index is None else f" record {index}"
        return f"datasets.{self.name} ({self.split}, {self.source}){row}"

    def _record(self, index: int) -> tuple[np.ndarray, int]:
        """Fetch and decode record ``index``: (checked image, checked label)."""
        where = self._where(index)
        try:
            record = self._records[index]  # one at a time: TFDS's mock ignores batched reads
        except Exception as exc:
            raise DatasetUnavailableError(
                f"{where}: TFDS failed to read it ({_short(exc)}); the prepared "
                "files may be incomplete or corrupt: prepare the dataset again"
            ) from exc
        image = check_image(np.asarray(record[self.image_key]), where)
        label = int(np.asarray(record[self.label_key]))
        if not 0 <= label < self._num_classes:
            raise ValueError(
                f"{where}: label {label} outside [0, {self._num_classes}) "
                f"(label_key {self.label_key!r})"
            )
        return image, label

    def read(self, start: int, stop: int) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Rows [start, stop): (images uint8, labels int32); see ``ImageSource``.

        Only these records are fetched and decoded, in ``decode_threads`` threads.
        """
        start, stop = check_row_range(start, stop, self._num_examples, self._where())
        with self._lock:
            rows = map_in_threads(self._record, range(start, stop), self.decode_threads)
        images = [image for image, _ in rows]
        labels = np.array([label for _, label in rows], dtype=np.int32).reshape(-1)
        return stack_if_uniform(images), labels

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, split={self.split!r}, source={self.source!r}, "
            f"num_examples={self._num_examples}, num_classes={self._num_classes})"
        )


def _remedy(key: str, tfds_name: str, allow_network: bool) -> str:
    prepare = (
        f"prepare it once where TensorFlow and the network are available "
        f"(`tfds build {tfds_name} --data_dir=DIR --file_format=array_record`; "
        "imagenet2012 also needs its archives in DIR/downloads/manual) "
        f"and set datasets.{key}.data_dir to DIR"
    )
    if allow_network:
        return (
            f"To fix: {prepare}. With allow_network: true, TFDS tried to download and prepare "
            "it here, which needs tensorflow installed (pip install tensorflow-cpu) and the "
            "network."
        )
    return (
        f"The pipeline reads only data already prepared in the array_record format. To fix: "
        f"{prepare}; or set datasets.{key}.allow_network: true to let TFDS download and "
        "prepare it on this machine (this needs tensorflow installed and the network)."
    )


def _prepared(tfds: Any, tfds_name: str, data_dir: str | None) -> tuple[str, list[str]]:
    """(a note on where TFDS looked for prepared data, its split names), for error messages."""
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        version_dir = str(builder.data_dir)
    except Exception:
        return "", []
    if not os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        return f": no prepared data at {version_dir}", []
    try:
        splits = sorted(str(split) for split in builder.info.splits)
    except Exception:
        splits = []
    return f": prepared data at {version_dir}", splits


def _split_names(tfds_split: str) -> set[str]:
    """The split names a TFDS split string refers to: "train[:10%]+validation" -> both."""
    return {part.split("[", 1)[0].strip() for part in tfds_split.split("+")}


def open_tfds(name: str, spec: Mapping, split: str) -> TfdsSource:
    """Open split ``split`` of the ``source: tfds`` entry ``datasets.<name>``.

    Spec keys (all optional but ``source``): tfds_name (default ``name``), data_dir
    (TFDS data dir, default the TFDS default), splits (our split -> TFDS split string,
    default identity), image_key / label_key (default "image" / "label"), num_classes
    (only needed when the label feature does not say), allow_network (may TFDS download
    and prepare; needs TensorFlow), max_train_examples / max_test_examples (keep the
    first n records of the split, in TFDS order).

    Raises:
      ValueError, TypeError: a bad spec, an unknown TFDS name, or metadata that does not fit.
      DatasetUnavailableError: TFDS could not open the split (not prepared, no TFDS, ...).
    """
    where = f"datasets.{name}"
    specs.check_keys(where, spec, TFDS_KEYS, "tfds")
    specs.check_split(where, split)
    tfds_name = specs.optional_str(where, spec, "tfds_name", name)
    assert tfds_name is not None
    data_dir = specs.optional_str(where, spec, "data_dir", None)
    if data_dir is not None:
        data_dir = os.path.expanduser(data_dir)
    tfds_split = specs.split_mapping(where, spec, {s: s for s in specs.SPLITS})[split]
    image_key = specs.optional_str(where, spec, "image_key", "image")
    label_key = specs.optional_str(where, spec, "label_key", "label")
    spec_classes = specs.optional_int(where, spec, "num_classes")
    allow_network = specs.optional_bool(where, spec, "allow_network")
    limit = specs.max_examples(where, spec, split)
    dir_text = (
        data_dir
        if data_dir is not None
        else "the TFDS default (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    what = (
        f"{where} ({split}): TFDS dataset {tfds_name!r} split {tfds_split!r} in data_dir {dir_text}"
    )

    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DatasetUnavailableError(
            f"{what}: tensorflow-datasets is not installed ({exc}); pip install tensorflow-datasets"
        ) from exc
    try:
        records: Any = tfds.data_source(
            tfds_name, split=tfds_split, data_dir=data_dir, download=allow_network
        )
    except tfds.core.DatasetNotFoundError as exc:
        raise ValueError(
            f"{what}: TFDS has no dataset {tfds_name!r}; set datasets.{name}.tfds_name to a name "
            "from the TFDS catalog (https://www.tensorflow.org/datasets/catalog), e.g. cifar10"
        ) from exc
    except Exception as exc:  # TFDS raises many types here; all mean "could not open it"
        found, known_splits = _prepared(tfds, tfds_name, data_dir)
        unknown = sorted(_split_names(tfds_split) - set(known_splits))
        if known_splits and unknown:
            raise ValueError(
                f"{where}.splits.{split}={tfds_split!r}: {tfds_name!r} in {dir_text} has no "
                f"split {', '.join(map(repr, unknown))}; its splits are "
                f"{', '.join(known_splits)}. Map {split} to one of them with "
                f"datasets.{name}.splits (e.g. {{{split}: {known_splits[-1]}}})"
            ) from exc
        raise DatasetUnavailableError(
            f"{what}: TFDS could not open it{found} ({_short(exc)}). "
            + _remedy(name, tfds_name, allow_network)
        ) from exc

    features = records.dataset_info.features
    for option, key in (("image_key", image_key), ("label_key", label_key)):
        if key not in features:
            raise ValueError(
                f"{where}.{option}={key!r}: {tfds_name!r} has no feature {key!r}; "
                f"its features are {', '.join(sorted(features.keys()))}"
            )
    info_classes = getattr(features[label_key], "num_classes", None)
    if info_classes is None and spec_classes is None:
        raise ValueError(
            f"{what}: the label feature {label_key!r} does not give the number of classes; "
            f"set datasets.{name}.num_classes"
        )
    if info_classes is not None and spec_classes is not None and info_classes != spec_classes:
        raise ValueError(
            f"{where}.num_classes={spec_classes}: but TFDS says {tfds_name!r} feature "
            f"{label_key!r} has {info_classes} classes; remove num_classes or fix it"
        )
    num_classes = int(spec_classes if spec_classes is not None else info_classes)

    total = len(records)
    if total == 0:
        raise ValueError(f"{what}: the split has no examples")
    if limit is not None and limit > total:
        raise ValueError(
            f"{where}.max_{split}_examples={limit}: but {tfds_name!r} split {tfds_split!r} "
            f"has {total} examples"
        )
    return TfdsSource(
        name=name,
        split=split,
        tfds_name=tfds_name,
        tfds_split=tfds_split,
        data_dir=data_dir,
        records=records,
        num_examples=total if limit is None else limit,
        num_classes=num_classes,
        image_key=image_key,
        label_key=label_key,
        image_shape=_fixed_shape(features[image_key]),
        class_names=_class_names(features[label_key], num_classes),
    )


def _class_names(feature: Any, num_classes: int) -> tuple[str, ...] | None:
    """The label feature's class names (TFDS ClassLabel.names), when it has one per class."""
    names = getattr(feature, "names", None)
    if not names or len(names) != num_classes:
        return None
    return tuple(str(n) for n in names)


def _fixed_shape(feature: Any) -> tuple[int, ...] | None:
    """The image feature's shape when TFDS fixes every dimension, else None."""
    shape = getattr(feature, "shape", None)
    if not shape or any(n is None for n in shape):
        return None
    return tuple(int(n) for n in shape)
