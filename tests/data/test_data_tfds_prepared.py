"""`source: tfds` on real array_record files that the test prepares itself, without TensorFlow.

TFDS can prepare a dataset without TensorFlow when images arrive already encoded
(PNG files), so these tests exercise the real reading path: dataset_info from
disk, split names, record order and lazy decoding.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from pipeline_lib.data import DatasetUnavailableError, open_dataset

tfds = pytest.importorskip("tensorflow_datasets")

SIZES = {"train": 7, "validation": 4}


def _pixels(split: str, i: int) -> np.ndarray:
    """A distinct image per record: the height varies, every pixel encodes (split, i)."""
    value = (100 if split == "validation" else 0) + 10 * i
    return np.full((4 + i % 3, 6, 3), value, np.uint8)


class DpTestTinyImages(tfds.core.GeneratorBasedBuilder):
    """7 train and 4 validation RGB images of varying height, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to look for (finding one needs importlib_resources for a module
    # inside a package, which TFDS 4.9.10 does not install).
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split="train"):
        folder = self._png_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(SIZES[split]):
            path = folder / f"{i}.png"
            Image.fromarray(_pixels(split, i)).save(path)
            yield i, {"image": str(path), "label": i % 3, "index": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    builder = DpTestTinyImages(data_dir=str(root / "data"), file_format="array_record")
    builder._png_dir = root / "png"
    try:
        builder.download_and_prepare()
    except Exception as exc:  # e.g. a TFDS version that needs TensorFlow to prepare
        pytest.skip(f"cannot prepare array_record data without TensorFlow here: {exc}")
    return str(root / "data")


def _open(data_dir, split="train", **options):
    spec = {"source": "tfds", "tfds_name": "dp_test_tiny_images", "data_dir": data_dir}
    return open_dataset("tiny", {**spec, **options}, split)


def _expected(data, split, start, stop):
    """What rows [start, stop) should hold, from the records' own index feature."""
    records = tfds.data_source(
        "dp_test_tiny_images", split=data.tfds_split, data_dir=data.data_dir, download=False
    )
    indices = [int(records[row]["index"]) for row in range(start, stop)]
    return [_pixels(split, i) for i in indices], np.array([i % 3 for i in indices])


def test_reads_prepared_data(data_dir):
    data = _open(data_dir)
    assert (data.name, data.tfds_name, data.num_examples, data.num_classes) == (
        "tiny",
        "dp_test_tiny_images",
        7,
        3,
    )
    assert data.source == f"tfds:dp_test_tiny_images/train in {data_dir}"
    images, labels = data.read(0, 7)
    assert isinstance(images, list)  # heights vary
    want_images, want_labels = _expected(data, "train", 0, 7)
    for image, want in zip(images, want_images, strict=True):
        np.testing.assert_array_equal(image, want)
    np.testing.assert_array_equal(labels, want_labels)
    assert labels.dtype == np.int32


def test_split_mapping_and_ranges(data_dir):
    data = _open(data_dir, "test", splits={"test": "validation"})
    assert data.num_examples == 4 and data.tfds_split == "validation"
    images, labels = data.read(1, 3)
    want_images, want_labels = _expected(data, "validation", 1, 3)
    for image, want in zip(images, want_images, strict=True):
        np.testing.assert_array_equal(image, want)
    np.testing.assert_array_equal(labels, want_labels)
    assert min(int(image[0, 0, 0]) for image in images) >= 100  # validation records


def test_tfds_slicing_and_max_examples(data_dir):
    head = _open(data_dir, max_train_examples=3)
    sliced = _open(data_dir, splits={"train": "train[:3]"})
    assert head.num_examples == sliced.num_examples == 3
    for a, b in zip(head.read(0, 3)[0], sliced.read(0, 3)[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_missing_split_names_it_and_the_known_ones(data_dir):
    with pytest.raises(ValueError) as info:
        _open(data_dir, "test")  # the dataset has no 'test' split
    assert str(info.value).startswith(
        f"datasets.tiny.splits.test='test': 'dp_test_tiny_images' in {data_dir} has no split "
        "'test'; its splits are train, validation. Map test to one of them"
    )
    with pytest.raises(ValueError, match=r"has no split 'valid'; its splits are train, validation"):
        _open(data_dir, "test", splits={"test": "train[:2]+valid[:1]"})


def test_a_missing_version_is_unavailable(data_dir):
    with pytest.raises(
        DatasetUnavailableError, match=r"cannot be loaded at version 9.9.9, only: 1.0.0"
    ):
        _open(data_dir, tfds_name="dp_test_tiny_images:9.9.9")


def test_read_in_a_background_thread(data_dir):
    data = _open(data_dir)
    box = []
    thread = threading.Thread(target=lambda: box.append(data.read(2, 5)))
    thread.start()
    thread.join()
    for a, b in zip(box[0][0], data.read(2, 5)[0], strict=True):
        np.testing.assert_array_equal(a, b)
