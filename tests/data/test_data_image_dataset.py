"""ImageDataset validates on construction and names the dataset in every error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline_lib.data import ImageDataset


def _make(**overrides):
    fields = dict(
        images=np.zeros((4, 5, 6), np.uint8),
        labels=np.array([0, 1, 2, 1], np.int32),
        num_classes=3,
        name="toy",
        split="train",
        source="/data/toy.idx",
    )
    fields.update(overrides)
    return ImageDataset(**fields)


def test_valid_grey_and_colour():
    ds = _make()
    assert ds.num_examples == 4 and ds.image_shape == (5, 6)
    colour = _make(images=np.zeros((4, 5, 6, 3), np.uint8))
    assert colour.image_shape == (5, 6, 3)
    assert "uint8[4, 5, 6]" in repr(ds) and "toy" in repr(ds)


def test_frozen():
    ds = _make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.num_classes = 5


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (
            {"images": np.zeros((4, 5, 6), np.float32)},
            ValueError,
            r"images must be uint8, got float32",
        ),
        (
            {"images": np.zeros((4, 30), np.uint8)},
            ValueError,
            r"\(N, H, W\) or \(N, H, W, C\), got \(4, 30\)",
        ),
        ({"images": np.zeros((4, 5, 0), np.uint8)}, ValueError, r"empty dimension"),
        ({"images": [[0]]}, TypeError, r"images must be a numpy array, got list"),
        (
            {"labels": np.array([0, 1, 2, 1], np.uint8)},
            ValueError,
            r"labels must be int32, got uint8",
        ),
        ({"labels": np.zeros((4, 1), np.int32)}, ValueError, r"labels must have shape \(N,\)"),
        (
            {"labels": np.array([0, 1, 2], np.int32)},
            ValueError,
            r"4 images but 3 labels; counts must match",
        ),
        (
            {"labels": np.array([0, 3, -1, 1], np.int32)},
            ValueError,
            r"2 labels outside \[0, 3\), first at index 1 with value 3",
        ),
        ({"num_classes": 0}, ValueError, r"num_classes must be at least 1, got 0"),
        ({"num_classes": True}, TypeError, r"num_classes must be an int"),
        (
            {"images": np.zeros((0, 5, 6), np.uint8), "labels": np.zeros(0, np.int32)},
            ValueError,
            r"no examples",
        ),
    ],
)
def test_invalid(overrides, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        _make(**overrides)
    assert str(info.value).startswith("toy/train (from /data/toy.idx): ")
