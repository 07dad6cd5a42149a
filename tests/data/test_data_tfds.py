"""`source: tfds`: lazy reads through tfds.data_source, on TFDS mock data and on fakes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline_lib.data import DatasetUnavailableError, ImageSource, TfdsSource, open_dataset

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=9):
        yield


def _open(name, split="train", **options):
    return open_dataset(name, {"source": "tfds", **options}, split)


# --- mock data ------------------------------------------------------------------------


def test_cifar10_by_key(mock_tfds):
    data = _open("cifar10")
    assert isinstance(data, TfdsSource) and isinstance(data, ImageSource)
    assert (data.name, data.split, data.tfds_name, data.tfds_split) == (
        "cifar10",
        "train",
        "cifar10",
        "train",
    )
    assert data.source == "tfds:cifar10/train"
    assert (data.num_examples, data.num_classes) == (9, 10)
    images, labels = data.read(0, 9)
    assert isinstance(images, np.ndarray)
    assert images.dtype == np.uint8 and images.shape == (9, 32, 32, 3)
    assert labels.dtype == np.int32 and labels.shape == (9,)
    assert labels.min() >= 0 and labels.max() < 10
    assert images.std() > 10  # random pixels, not a constant fill


def test_read_ranges_agree_with_a_full_read(mock_tfds):
    data = _open("my_key", tfds_name="cifar10")
    assert data.name == "my_key" and data.tfds_name == "cifar10"
    images, labels = data.read(0, 9)
    for start, stop in [(0, 1), (2, 5), (8, 9), (0, 9)]:
        part_images, part_labels = data.read(start, stop)
        np.testing.assert_array_equal(part_images, images[start:stop])
        np.testing.assert_array_equal(part_labels, labels[start:stop])
    empty_images, empty_labels = data.read(4, 4)
    assert len(empty_images) == 0 and empty_labels.shape == (0,)


@pytest.mark.parametrize(("start", "stop"), [(-1, 2), (3, 2), (0, 10), (9, 10)])
def test_read_outside_the_split(mock_tfds, start, stop):
    data = _open("cifar10")
    with pytest.raises(IndexError, match=rf"datasets.cifar10 .*rows \[{start}, {stop}\)"):
        data.read(start, stop)


def test_mnist_is_grey_with_a_channel_axis(mock_tfds):
    data = _open("digits", tfds_name="mnist", split="test")
    images, _ = data.read(0, 3)
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
    assert data.num_classes == 10


def test_cifar100_num_classes(mock_tfds):
    assert _open("cifar100").num_classes == 100


def test_variable_size_images_come_back_as_a_list(mock_tfds):
    data = _open("imagenet", tfds_name="imagenet2012", splits={"test": "validation"}, split="test")
    assert data.tfds_split == "validation" and data.num_classes == 1000
    images, labels = data.read(0, 4)
    assert isinstance(images, list) and len(images) == 4
    assert len({image.shape for image in images}) > 1  # mock imagenet sizes vary
    for image in images:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert labels.shape == (4,) and labels.max() < 1000


def test_split_mapping_reaches_tfds(mock_tfds, monkeypatch):
    calls = []
    real = tfds.data_source

    def spy(name, **kwargs):
        calls.append((name, kwargs["split"], kwargs["data_dir"], kwargs["download"]))
        return real(name, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    spec = {"tfds_name": "imagenet2012", "splits": {"test": "validation"}, "data_dir": "/d"}
    train = _open("imagenet", **spec)
    test = _open("imagenet", split="test", **spec)
    assert calls == [
        ("imagenet2012", "train", "/d", False),
        ("imagenet2012", "validation", "/d", False),
    ]
    assert test.source == "tfds:imagenet2012/validation in /d"
    assert train.source == "tfds:imagenet2012/train in /d"


def test_allow_network_lets_tfds_download(mock_tfds, monkeypatch):
    calls = []
    real = tfds.data_source
    monkeypatch.setattr(
        tfds, "data_source", lambda name, **kw: calls.append(kw["download"]) or real(name, **kw)
    )
    _open("cifar10", allow_network=True)
    _open("cifar10", allow_network=False)
    _open("cifar10")
    assert calls == [True, False, False]


def test_max_examples_keeps_the_first_records(mock_tfds):
    full = _open("cifar10", split="test")
    head = _open("cifar10", split="test", max_test_examples=4, max_train_examples=2)
    assert head.num_examples == 4
    np.testing.assert_array_equal(head.read(0, 4)[0], full.read(0, 4)[0])
    with pytest.raises(IndexError):
        head.read(0, 5)
    with pytest.raises(
        ValueError,
        match=r"datasets.cifar10.max_test_examples=10: but 'cifar10' split 'test' has 9 examples",
    ):
        _open("cifar10", split="test", max_test_examples=10)


def test_mock_data_is_the_same_in_two_opens():
    with tfds.testing.mock_data(num_examples=4):
        first = _open("cifar10").read(0, 4)
    with tfds.testing.mock_data(num_examples=4):
        second = _open("cifar10").read(0, 4)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_read_from_a_background_thread(mock_tfds):
    data = _open("cifar10")
    expected = data.read(2, 6)
    result = []
    thread = threading.Thread(target=lambda: result.append(data.read(2, 6)))
    thread.start()
    thread.join()
    np.testing.assert_array_equal(result[0][0], expected[0])


def test_unknown_image_or_label_key(mock_tfds):
    with pytest.raises(ValueError, match=r"datasets.c.image_key='img': 'cifar10' has no feature"):
        _open("c", tfds_name="cifar10", image_key="img")
    with pytest.raises(ValueError, match=r"features are id, image, label"):
        _open("c", tfds_name="cifar10", label_key="fine_label")


def test_num_classes_from_spec_must_agree(mock_tfds):
    assert _open("cifar10", num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match=r"datasets.cifar10.num_classes=7: but TFDS says"):
        _open("cifar10", num_classes=7)


def test_unknown_tfds_name(mock_tfds):
    with pytest.raises(ValueError) as info:
        _open("my_data")
    message = str(info.value)
    assert "datasets.my_data (train): TFDS dataset 'my_data'" in message
    assert "set datasets.my_data.tfds_name" in message
    assert len(message) < 600  # not TFDS's list of every dataset


# --- not prepared (real TFDS, offline) --------------------------------------------------


def test_unprepared_data_offline_names_dir_and_remedies(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        _open("cifar10", split="test", data_dir=str(tmp_path))
    message = str(info.value)
    assert f"in data_dir {tmp_path}" in message
    assert f"no prepared data at {tmp_path / 'cifar10'}" in message
    assert "tfds build cifar10 --data_dir=DIR --file_format=array_record" in message
    assert "datasets.cifar10.allow_network: true" in message
    assert "tensorflow" in message
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written


def test_failed_download_says_tensorflow_is_needed(tmp_path, monkeypatch):
    def no_tensorflow(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds, "data_source", no_tensorflow)
    with pytest.raises(DatasetUnavailableError) as info:
        _open("cifar10", data_dir=str(tmp_path), allow_network=True)
    message = str(info.value)
    assert "ModuleNotFoundError: No module named 'tensorflow'" in message
    assert "needs tensorflow installed (pip install tensorflow-cpu)" in message


def test_tfds_not_installed(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DatasetUnavailableError, match=r"tensorflow-datasets is not installed"):
        _open("cifar10")


# --- fakes: metadata, laziness and bad records ------------------------------------------


class _Feature:
    def __init__(self, num_classes=None):
        if num_classes is not None:
            self.num_classes = num_classes


class _Info:
    def __init__(self, features):
        self.features = features


class _Records:
    """A data source whose records are made on access, counting the accesses."""

    def __init__(self, records, features):
        self._records = records
        self.dataset_info = _Info(features)
        self.accessed: list[int] = []

    def __len__(self):
        return len(self._records)

    def __getitem__(self, index):
        self.accessed.append(index)
        return self._records[index]


def _fake(monkeypatch, records, *, num_classes=None):
    fake = _Records(records, {"image": _Feature(), "label": _Feature(num_classes)})
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: fake)
    return fake


def _grey(value, shape=(4, 5)):
    return np.full(shape, value, np.uint8)


def test_read_fetches_only_the_rows_asked_for(monkeypatch):
    fake = _fake(
        monkeypatch, [{"image": _grey(i), "label": i % 3} for i in range(10)], num_classes=3
    )
    data = _open("fake")
    assert fake.accessed == []  # opening decodes nothing
    images, labels = data.read(3, 6)
    assert sorted(fake.accessed) == [3, 4, 5]  # fetched in threads, in any order
    assert images.shape == (3, 4, 5)
    np.testing.assert_array_equal(images[:, 0, 0], [3, 4, 5])
    np.testing.assert_array_equal(labels, [0, 1, 2])


@pytest.mark.parametrize("threads", [1, 3])
def test_errors_follow_row_order_in_any_thread_count(monkeypatch, threads):
    records = [{"image": _grey(0), "label": label} for label in (0, 1, 7, 9, 0)]
    _fake(monkeypatch, records, num_classes=3)
    data = _open("fake")
    data.decode_threads = threads
    with pytest.raises(ValueError, match=r"record 2: label 7 outside"):
        data.read(0, 5)


def test_num_classes_missing_from_metadata(monkeypatch):
    _fake(monkeypatch, [{"image": _grey(0), "label": 0}])
    with pytest.raises(
        ValueError, match=r"does not give the number of classes; set datasets.fake.num_classes"
    ):
        _open("fake")
    assert _open("fake", num_classes=4).num_classes == 4


def test_label_out_of_range_names_the_record(monkeypatch):
    _fake(
        monkeypatch,
        [{"image": _grey(0), "label": 1}, {"image": _grey(0), "label": 5}],
        num_classes=3,
    )
    data = _open("fake")
    data.read(0, 1)
    with pytest.raises(ValueError, match=r"datasets.fake .* record 1: label 5 outside \[0, 3\)"):
        data.read(0, 2)


@pytest.mark.parametrize(
    ("image", "pattern"),
    [
        (np.zeros((4, 4), np.float32), r"record 0: images must be uint8, got float32"),
        (np.zeros((4, 4, 4), np.uint8), r"record 0: images must have shape .* got \(4, 4, 4\)"),
        (np.zeros((0, 4), np.uint8), r"record 0: the image has an empty dimension"),
    ],
)
def test_bad_images_name_the_record(monkeypatch, image, pattern):
    _fake(monkeypatch, [{"image": image, "label": 0}], num_classes=2)
    with pytest.raises(ValueError, match=pattern):
        _open("fake").read(0, 1)


def test_empty_split(monkeypatch):
    _fake(monkeypatch, [], num_classes=2)
    with pytest.raises(ValueError, match=r"datasets.fake \(train\): .* the split has no examples"):
        _open("fake")


def test_failed_record_read_is_an_unavailable_error(monkeypatch):
    fake = _fake(monkeypatch, [{"image": _grey(0), "label": 0}], num_classes=2)
    data = _open("fake")
    fake._records = None  # indexing now raises TypeError, like a corrupt file would raise
    with pytest.raises(DatasetUnavailableError, match=r"record 0: TFDS failed to read it"):
        data.read(0, 1)


def test_fixed_shape_datasets_declare_image_shape_variable_ones_do_not():
    """The extractor resizes on the device only for sources with one declared shape."""
    import tensorflow_datasets as tfds

    from pipeline_lib.data import open_dataset

    with tfds.testing.mock_data(num_examples=4):
        cifar = open_dataset("cifar10", {"source": "tfds"}, "train")
        imagenet = open_dataset("imagenet2012", {"source": "tfds"}, "train")
        assert cifar.image_shape == (32, 32, 3)
        assert cifar.read(0, 4)[0].shape == (4, 32, 32, 3)
        assert not hasattr(imagenet, "image_shape")
        assert isinstance(imagenet.read(0, 2)[0], list)


def test_class_names_come_from_the_label_feature(mock_tfds):
    data = _open("cifar10")
    names = data._records.dataset_info.features["label"].names  # what TFDS says (mock: "0"..)
    assert data.class_names == tuple(names)
    assert len(data.class_names) == data.num_classes == 10
