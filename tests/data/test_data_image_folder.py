"""`source: image_folder`: layout, class order, lazy decoding, conversions and errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline_lib.data.image_folder as image_folder
from pipeline_lib.data import (
    DatasetUnavailableError,
    ImageDecodeError,
    ImageFolderSource,
    ImageSource,
    open_dataset,
)


def _rgb(value: int, size=(6, 4)) -> np.ndarray:
    """An RGB image (H, W, 3) = size whose channels are value, value + 1, value + 2."""
    image = np.empty((*size, 3), np.uint8)
    image[...] = [value, value + 1, value + 2]
    return image


def _write(path: Path, array: np.ndarray, **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_options)
    return path


def _rel(path: str) -> str:
    """ "class/file" of an image path."""
    return "/".join(Path(path).parts[-2:])


def _open(root: Path, split: str = "train", name: str = "flowers", **options):
    return open_dataset(name, {"source": "image_folder", "path": str(root), **options}, split)


@pytest.fixture
def tree(tmp_path):
    """train: 3 classes (cat 2 files, dog 3, emu 1); test: cat 1, emu 1. PNG files."""
    layout = {
        "train": {"dog": ["b.png", "a.png", "c.png"], "cat": ["z.png", "y.png"], "emu": ["e.png"]},
        "test": {"cat": ["t.png"], "emu": ["u.png"]},
    }
    value = 0
    for split, classes in layout.items():
        for class_name, files in classes.items():
            for file in files:
                _write(tmp_path / split / class_name / file, _rgb(value))
                value += 10
    return tmp_path


def test_rows_in_class_then_file_name_order(tree):
    data = _open(tree)
    assert isinstance(data, ImageFolderSource) and isinstance(data, ImageSource)
    assert (data.name, data.split) == ("flowers", "train")
    assert data.source == f"image_folder:{tree / 'train'}"
    assert data.class_names == ("cat", "dog", "emu")
    assert (data.num_examples, data.num_classes) == (6, 3)
    assert [_rel(p) for p in data.files] == [
        "cat/y.png",
        "cat/z.png",
        "dog/a.png",
        "dog/b.png",
        "dog/c.png",
        "emu/e.png",
    ]
    images, labels = data.read(0, 6)
    assert images.dtype == np.uint8 and images.shape == (6, 6, 4, 3)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1, 2])
    assert labels.dtype == np.int32
    # Written in layout order: dog b=0 a=10 c=20, cat z=30 y=40, emu e=50.
    np.testing.assert_array_equal(images[:, 0, 0, 0], [40, 30, 10, 0, 20, 50])
    np.testing.assert_array_equal(images[0, 2, 3], [40, 41, 42])


def test_test_split_uses_the_train_classes(tree):
    data = _open(tree, "test")
    assert data.class_names == ("cat", "dog", "emu") and data.num_classes == 3
    images, labels = data.read(0, 2)
    np.testing.assert_array_equal(labels, [0, 2])  # emu keeps label 2 though dog is absent
    np.testing.assert_array_equal(images[:, 0, 0, 0], [60, 70])


def test_read_ranges(tree):
    data = _open(tree)
    images, labels = data.read(0, 6)
    for start, stop in [(0, 1), (1, 4), (5, 6)]:
        part_images, part_labels = data.read(start, stop)
        np.testing.assert_array_equal(part_images, images[start:stop])
        np.testing.assert_array_equal(part_labels, labels[start:stop])
    with pytest.raises(IndexError, match=r"datasets.flowers .*rows \[4, 7\) outside \[0, 6\)"):
        data.read(4, 7)


def test_split_mapping_and_extensions(tree):
    (tree / "test").rename(tree / "val")
    _write(tree / "train" / "cat" / "x.JPG", _rgb(200), quality=95)
    (tree / "train" / "cat" / "notes.txt").write_text("not an image, skipped by extension")
    (tree / "train" / ".DS_Store").write_bytes(b"\x00")
    data = _open(tree, "test", splits={"test": "val"})
    assert data.folder == tree / "val" and data.num_examples == 2
    default = _open(tree)
    assert [Path(p).name for p in default.files][:3] == ["x.JPG", "y.png", "z.png"]
    assert default.num_examples == 7  # notes.txt and .DS_Store are skipped
    assert _open(tree, extensions=[".jpg", "PNG"]).num_examples == 7  # any case, dot optional
    assert _open(tree, extensions=["png"]).num_examples == 6
    with pytest.raises(ValueError, match=r"class folder .*train/dog holds no image files"):
        _open(tree, extensions=["jpg"])


def test_jpeg_grey_palette_rgba_and_16_bit_become_rgb(tmp_path):
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[..., 3] = 7  # alpha is dropped, not blended
    palette = Image.fromarray(np.tile(np.arange(6, dtype=np.uint8), (4, 1)), mode="P")
    colours = np.arange(6 * 3, dtype=np.uint8).reshape(6, 3) * 9
    palette.putpalette(colours.ravel().tolist())
    folder = tmp_path / "train"
    _write(folder / "a" / "1_grey.png", grey)
    _write(folder / "a" / "2_rgba.png", rgba)
    palette.save(folder / "a" / "3_palette.gif")
    _write(folder / "a" / "4_photo.jpg", _rgb(50, (4, 6)), quality=100)
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "a" / "5_grey16.png")
    _write(folder / "a" / "6_rgb.bmp", _rgb(70, (4, 6)))
    images, labels = _open(tmp_path).read(0, 6)
    assert images.shape == (6, 4, 6, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(images[1], np.broadcast_to([10, 20, 30], (4, 6, 3)))
    np.testing.assert_array_equal(images[2], np.broadcast_to(colours, (4, 6, 3)))
    assert np.abs(images[3].astype(int) - _rgb(50, (4, 6))).max() <= 3  # lossy JPEG
    np.testing.assert_array_equal(images[4], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(images[5], _rgb(70, (4, 6)))
    np.testing.assert_array_equal(labels, [0] * 6)


def test_mixed_sizes_come_back_as_a_list(tmp_path):
    _write(tmp_path / "train" / "a" / "1.png", _rgb(0, (5, 7)))
    _write(tmp_path / "train" / "b" / "1.png", _rgb(0, (3, 2)))
    images, labels = _open(tmp_path).read(0, 2)
    assert isinstance(images, list)
    assert [image.shape for image in images] == [(5, 7, 3), (3, 2, 3)]
    np.testing.assert_array_equal(labels, [0, 1])


def test_decoding_is_lazy(tree, monkeypatch):
    decoded = []
    real = image_folder.decode_image_file
    monkeypatch.setattr(
        image_folder,
        "decode_image_file",
        lambda path: decoded.append(Path(path).name) or real(path),
    )
    data = _open(tree)
    assert decoded == []
    data.read(2, 4)
    assert sorted(decoded) == ["a.png", "b.png"]  # decoded in threads, in any order


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_decode_threads_give_the_same_rows(tree, threads):
    data = _open(tree)
    expected = data.read(0, 6)
    data.decode_threads = threads
    images, labels = data.read(0, 6)
    np.testing.assert_array_equal(images, expected[0])
    np.testing.assert_array_equal(labels, expected[1])


def test_a_corrupt_file_outside_the_range_is_never_read(tree):
    (tree / "train" / "emu" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = _open(tree)
    data.read(0, 5)  # the corrupt file is row 5
    with pytest.raises(ImageDecodeError) as info:
        data.read(4, 6)
    message = str(info.value)
    assert message.startswith(f"{tree / 'train' / 'emu' / 'e.png'}: cannot decode the image")
    assert isinstance(info.value, ValueError)


def test_a_text_file_with_an_image_extension(tree):
    (tree / "train" / "cat" / "y.png").write_text("hello")
    with pytest.raises(ImageDecodeError, match=r"cat/y.png: cannot decode the image"):
        _open(tree).read(0, 1)


def test_a_truncated_jpeg(tmp_path):
    path = _write(tmp_path / "train" / "a" / "1.jpg", _rgb(0, (64, 64)))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageDecodeError, match=r"a/1.jpg: cannot decode the image"):
        _open(tmp_path).read(0, 1)


def test_read_from_a_background_thread(tree):
    data = _open(tree)
    result = []
    thread = threading.Thread(target=lambda: result.append(data.read(1, 3)))
    thread.start()
    thread.join()
    np.testing.assert_array_equal(result[0][0], data.read(1, 3)[0])


# --- max examples: a class-balanced public subset -----------------------------------------


def test_max_examples_is_a_round_robin_over_classes(tree):
    data = _open(tree, max_train_examples=4, max_test_examples=1)
    # Round robin: cat/y, dog/a, emu/e, then cat/z; rows stay in class-then-name order.
    assert [_rel(p) for p in data.files] == [
        "cat/y.png",
        "cat/z.png",
        "dog/a.png",
        "emu/e.png",
    ]
    np.testing.assert_array_equal(data.read(0, 4)[1], [0, 0, 1, 2])
    assert _open(tree, "test", max_test_examples=1).num_examples == 1
    assert _open(tree, max_train_examples=6).num_examples == 6
    with pytest.raises(ValueError, match=r"datasets.flowers.max_train_examples=7: but .* 6 images"):
        _open(tree, max_train_examples=7)


def test_round_robin_subset_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, 5, size=40)).astype(np.int32)
    slow = []
    by_class = [list(np.flatnonzero(labels == c)) for c in range(5)]
    for rank in range(40):
        slow.extend(rows[rank] for rows in by_class if rank < len(rows))
    for limit in (1, 5, 13, 40):
        np.testing.assert_array_equal(
            image_folder._round_robin_subset(labels, limit), sorted(slow[:limit])
        )


# --- layout errors ------------------------------------------------------------------------


def test_a_test_class_missing_from_train(tree):
    _write(tree / "test" / "fox" / "1.png", _rgb(0))
    with pytest.raises(ValueError) as info:
        _open(tree, "test")
    message = str(info.value)
    assert f"class folder(s) {tree / 'test' / 'fox'} have no counterpart" in message
    assert str(tree / "train") in message


def test_an_empty_class_folder(tree):
    (tree / "train" / "gnu").mkdir()
    (tree / "train" / "gnu" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=rf"class folder {tree / 'train' / 'gnu'} holds no image"):
        _open(tree)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=rf"the train folder {tmp_path / 'train'} has no class"):
        _open(tmp_path)


def test_an_image_directly_in_the_split_folder(tree):
    _write(tree / "train" / "stray.png", _rgb(0))
    with pytest.raises(ValueError, match=r"train/stray.png is an image directly in the split"):
        _open(tree)


def test_a_nested_folder_in_a_class_folder(tree):
    (tree / "train" / "cat" / "more").mkdir()
    with pytest.raises(ValueError, match=r"train/cat/more is a folder inside class folder"):
        _open(tree)


def test_missing_root_and_split_folders(tmp_path, tree):
    with pytest.raises(
        DatasetUnavailableError, match=r"datasets.flowers.path: folder .* not exist"
    ):
        _open(tmp_path / "nowhere")
    with pytest.raises(
        DatasetUnavailableError,
        match=rf"datasets.flowers.splits.test: split folder {tree / 'val'} does not exist",
    ):
        _open(tree, "test", splits={"test": "val"})


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        (
            {"extensions": "png"},
            TypeError,
            r"datasets.flowers.extensions: must be a non-empty list",
        ),
        ({"extensions": []}, TypeError, r"datasets.flowers.extensions: must be a non-empty list"),
        ({"splits": {"valid": "x"}}, ValueError, r"datasets.flowers.splits.valid: unknown split"),
        ({"splits": {"test": 3}}, TypeError, r"datasets.flowers.splits.test: must be a non-empty"),
        (
            {"max_train_examples": 0},
            ValueError,
            r"datasets.flowers.max_train_examples: must be >= 1",
        ),
        ({"data_dir": "/x"}, ValueError, r"datasets.flowers.data_dir: not an option of source"),
    ],
)
def test_bad_options(tree, options, error, pattern):
    with pytest.raises(error, match=pattern):
        _open(tree, **options)


def test_path_is_required():
    with pytest.raises(ValueError, match=r"datasets.flowers.path: required for source"):
        open_dataset("flowers", {"source": "image_folder"}, "train")
