"""Fashion-MNIST loading: crafted files, the real Debian files, and the TFDS fallback."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline_lib.data.sources as sources
from pipeline_lib.data import (
    DatasetUnavailableError,
    IdxFormatError,
    ImageDataset,
    known_datasets,
    load_dataset,
    load_fashion_mnist,
    register_dataset,
)
from pipeline_lib.data.idx import write_idx

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _make_split(
    folder: Path, prefix: str = "train", *, n: int = 12, labels=None, gz: bool = True, images=None
):
    rng = np.random.default_rng(1)
    if images is None:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    if labels is None:
        labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def _forbid_tfds(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the TFDS fallback must not be used here")

    monkeypatch.setattr(sources, "read_tfds_split", fail)


# --- crafted IDX files -------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_crafted_split_loads(tmp_path, gz):
    images, labels = _make_split(tmp_path, "t10k", n=12, gz=gz)
    ds = load_fashion_mnist("test", data_dir=tmp_path)
    assert isinstance(ds, ImageDataset)
    assert (ds.name, ds.split, ds.num_classes) == ("fashion_mnist", "test", 10)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (12, 28, 28)
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in ds.source


def test_max_examples_takes_the_first_n(tmp_path):
    images, labels = _make_split(tmp_path, n=12)
    ds = load_fashion_mnist("train", data_dir=tmp_path, max_examples=5)
    np.testing.assert_array_equal(ds.images, images[:5])
    np.testing.assert_array_equal(ds.labels, labels[:5])
    assert ds.images.flags["C_CONTIGUOUS"] and ds.images.base is None  # a copy, not a view


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (0, ValueError, r"fashion_mnist/train: max_examples must be > 0, got 0"),
        (-3, ValueError, r"max_examples must be > 0, got -3"),
        (13, ValueError, r"max_examples=13 but the split has 12 examples"),
        (True, TypeError, r"max_examples must be a positive int or None, got True"),
        (2.5, TypeError, r"max_examples must be a positive int or None, got 2.5"),
    ],
)
def test_bad_max_examples(tmp_path, value, error, pattern):
    _make_split(tmp_path, n=12)
    with pytest.raises(error, match=pattern):
        load_fashion_mnist("train", data_dir=tmp_path, max_examples=value)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_mismatched_counts_name_both_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (7, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(6, np.uint8))
    with pytest.raises(ValueError) as info:
        load_fashion_mnist("train", data_dir=tmp_path)
    assert str(info.value) == (
        f"fashion_mnist/train: {tmp_path / 'train-images-idx3-ubyte.gz'} holds 7 images but "
        f"{tmp_path / 'train-labels-idx1-ubyte.gz'} holds 6 labels; counts must match"
    )


def test_label_out_of_range_names_the_labels_file(tmp_path):
    labels = np.array([0, 1, 2, 10, 3, 11], dtype=np.uint8)
    _make_split(tmp_path, n=6, labels=labels)
    with pytest.raises(ValueError) as info:
        load_fashion_mnist("train", data_dir=tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'train-labels-idx1-ubyte.gz'}: 2 labels outside [0, 10), "
        "first at index 3 with value 10"
    )


def test_images_with_wrong_rank_or_dtype(tmp_path):
    _make_split(tmp_path, n=4, images=np.zeros((4, 784), np.uint8))
    with pytest.raises(
        ValueError, match=re.escape("train-images-idx3-ubyte.gz: expected uint8 images")
    ):
        load_fashion_mnist("train", data_dir=tmp_path)
    _make_split(tmp_path, n=4, images=np.zeros((4, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"images-idx3-ubyte.gz: .*got float32\[4, 28, 28\]"):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_labels_with_wrong_dtype(tmp_path):
    _make_split(tmp_path, n=4, labels=np.zeros(4, np.int32))
    with pytest.raises(
        ValueError, match=r"labels-idx1-ubyte.gz: expected uint8 labels .*got int32"
    ):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_corrupt_file_is_an_error_even_when_network_allowed(tmp_path, monkeypatch):
    _forbid_tfds(monkeypatch)
    _make_split(tmp_path, n=4)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(IdxFormatError, match=r"train-labels-idx1-ubyte.gz: corrupt gzip stream"):
        load_fashion_mnist("train", data_dir=tmp_path, allow_network=True)


# --- missing files -------------------------------------------------------------


def test_missing_files_offline_names_paths_and_remedies(tmp_path, monkeypatch):
    _forbid_tfds(monkeypatch)
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", data_dir=tmp_path)
    assert isinstance(info.value, DatasetUnavailableError)
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "`allow_network: true`" in message


def test_only_the_missing_file_is_named(tmp_path, monkeypatch):
    _forbid_tfds(monkeypatch)
    _make_split(tmp_path, n=4)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetUnavailableError) as info:
        load_fashion_mnist("train", data_dir=tmp_path)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message
    assert "train-images-idx3-ubyte.gz" not in message


def test_fallback_failure_says_what_to_install(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def unavailable(*args, **kwargs):
        raise RuntimeError("no prepared data and no network")

    monkeypatch.setattr(tfds, "data_source", unavailable)
    with pytest.raises(DatasetUnavailableError) as info:
        load_fashion_mnist("test", data_dir=tmp_path, allow_network=True)
    message = str(info.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in message
    assert "RuntimeError: no prepared data and no network" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert isinstance(info.value.__cause__, Exception)


def test_fallback_without_tfds_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DatasetUnavailableError, match=r"tensorflow-datasets is not installed"):
        load_fashion_mnist("train", data_dir=tmp_path, allow_network=True)


# --- TFDS fallback on mock data (no TensorFlow needed) ------------------------------


def test_tfds_fallback_on_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=9):
        ds = load_fashion_mnist("train", data_dir=tmp_path, allow_network=True)
        first = load_fashion_mnist("train", data_dir=tmp_path, allow_network=True, max_examples=4)
        with pytest.raises(ValueError, match=r"max_examples=10 but the split has 9 examples"):
            load_fashion_mnist("train", data_dir=tmp_path, allow_network=True, max_examples=10)
    assert ds.source == "tfds:fashion_mnist"
    assert ds.images.dtype == np.uint8 and ds.images.shape == (9, 28, 28)  # channel axis dropped
    assert ds.labels.dtype == np.int32 and ds.labels.shape == (9,)
    assert ds.labels.min() >= 0 and ds.labels.max() < 10
    np.testing.assert_array_equal(first.images, ds.images[:4])
    np.testing.assert_array_equal(first.labels, ds.labels[:4])


# --- the real Debian files -----------------------------------------------------------


@pytest.mark.skipif(
    not DEBIAN_DIR.is_dir(),
    reason=f"{DEBIAN_DIR} is absent (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist(monkeypatch):
    _forbid_tfds(monkeypatch)
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset("fashion_mnist", split)
        assert ds.images.shape == (n, 28, 28) and ds.images.dtype == np.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), [n // 10] * 10)
        assert 0 < ds.images.mean() < 255
    # The first training labels of Fashion-MNIST: ankle boot, T-shirt, T-shirt, dress, T-shirt.
    head = load_dataset("fashion_mnist", "train", max_examples=5)
    np.testing.assert_array_equal(head.labels, [9, 0, 0, 3, 0])


# --- the generic entry point -------------------------------------------------------


def test_load_dataset_dispatches_with_data_dir(tmp_path):
    _make_split(tmp_path, "t10k", n=3)
    ds = load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    assert ds.num_examples == 3


def test_load_dataset_unknown_name_lists_known(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown dataset 'cifar10'; known datasets: fashion_mnist"
    ):
        load_dataset("cifar10", "train")


def test_register_dataset(monkeypatch):
    import pipeline_lib.data as data

    monkeypatch.setattr(data, "_LOADERS", dict(data._LOADERS))

    def tiny(split, *, data_dir, allow_network, max_examples):
        return ImageDataset(
            images=np.zeros((2, 4, 4, 3), np.uint8),
            labels=np.array([0, 1], np.int32),
            num_classes=2,
            name="tiny",
            split=split,
            source="memory",
        )

    register_dataset("tiny", tiny)
    assert known_datasets() == ["fashion_mnist", "tiny"]
    assert load_dataset("tiny", "train").image_shape == (4, 4, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("tiny", tiny)


def test_fashion_mnist_class_names_follow_the_labels():
    from pipeline_lib.data.sources import FASHION_MNIST_CLASS_NAMES

    assert len(FASHION_MNIST_CLASS_NAMES) == 10
    assert FASHION_MNIST_CLASS_NAMES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASS_NAMES[9] == "Ankle boot"
