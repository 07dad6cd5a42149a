"""ScatterNet: the numbers of Tramèr & Boneh, agreement with kymatio's NumPy frontend, the
registry entry, and a small extraction through the library path the workflow uses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pipeline_lib.backbones as backbones
from pipeline_lib.backbones import scatternet

FMNIST = Path("/usr/share/datasets/fashion-mnist")
# Max |difference| from kymatio's NumPy frontend, for coefficients of size up to ~1 (the
# order-0 average of a [0, 1] image). Measured: 2e-7 on random images (float32 FFTs).
TOLERANCE = 1e-5


def _reference(gray01: np.ndarray) -> np.ndarray:
    """kymatio's NumPy frontend with Tramèr & Boneh's parameters: (B, 81, 7, 7)."""
    from kymatio.scattering2d.frontend.numpy_frontend import ScatteringNumPy2D

    return ScatteringNumPy2D(J=2, shape=gray01.shape[1:], L=8, max_order=2)(gray01)


def _features(images_uint8: np.ndarray) -> dict:
    """The registry backbone on uint8 grayscale (B, 28, 28), as extraction feeds it."""
    backbone = backbones.get_backbone("scatternet")
    variables, _ = backbone.load_variables(28)
    rgb = jnp.repeat(jnp.asarray(images_uint8, jnp.float32)[..., None], 3, axis=-1)
    out = jax.jit(backbone.module.apply)(variables, backbone.preprocess(rgb))
    return jax.tree.map(np.asarray, out)


def test_paper_numbers():
    # 1 + J*L + L^2 * J(J-1)/2 with J=2, L=8; a 7 x 7 grid on 28 x 28 images.
    assert scatternet.num_channels() == 81
    assert scatternet.FEATURE_DIM == 81 * 7 * 7 == 3969
    assert scatternet.num_channels(3, 8) == 1 + 24 + 64 * 3
    assert scatternet.feature_dim(32) == 81 * 8 * 8
    assert scatternet.DESCRIPTOR == "scatternet J=2 L=8 order=2"
    assert scatternet.CHECKPOINT_SHA256 == hashlib.sha256(b"scatternet J=2 L=8 order=2").hexdigest()


def test_output_shapes_and_channel_major_flattening():
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    out = _features(images)
    assert out["pre_logits"].shape == (5, 3969)
    assert out["pre_logits"].dtype == np.float32
    assert out["scattering"].shape == (5, 81, 7, 7)
    np.testing.assert_array_equal(out["pre_logits"], out["scattering"].reshape(5, -1))
    assert np.isfinite(out["pre_logits"]).all()
    assert (out["pre_logits"] >= 0).all()  # averages of moduli (order 0: of a [0,1] image)


def test_agrees_with_kymatio_numpy_on_random_images():
    images = np.random.default_rng(1).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    want = _reference(images.astype(np.float32) / 255.0)
    got = _features(images)["scattering"]
    assert np.abs(want).max() > 0.1  # the comparison is not between near-zeros
    assert np.abs(got - want).max() <= TOLERANCE
    # Order 0 is the low-pass average of the image: about its mean on a [0, 1] scale.
    np.testing.assert_allclose(
        got[:, 0].mean(axis=(1, 2)), images.mean(axis=(1, 2)) / 255.0, rtol=0.1
    )


def test_module_takes_grayscale_with_or_without_channel_axis():
    module = scatternet.ScatterNet()
    x = np.random.default_rng(2).random((2, 28, 28)).astype(np.float32)
    a = module.apply({}, x)["pre_logits"]
    b = module.apply({}, x[..., None])["pre_logits"]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expects grayscale images"):
        module.apply({}, np.zeros((2, 28, 28, 3), np.float32))


def test_preprocess_gives_back_gray_in_unit_range():
    gray = np.random.default_rng(3).integers(0, 256, size=(2, 28, 28)).astype(np.float32)
    rgb = jnp.repeat(jnp.asarray(gray)[..., None], 3, axis=-1)
    np.testing.assert_allclose(scatternet.preprocess_images(rgb), gray / 255.0, atol=1e-7)
    colour = jnp.stack([jnp.zeros((1, 2, 2)), jnp.full((1, 2, 2), 255.0), jnp.zeros((1, 2, 2))], -1)
    np.testing.assert_allclose(scatternet.preprocess_images(colour), 1.0 / 3.0, rtol=1e-6)


def test_registry_entry():
    assert "scatternet" in backbones.list_backbones()
    backbone = backbones.get_backbone("scatternet")
    assert (backbone.name, backbone.native_image_size, backbone.feature_dim) == (
        "scatternet",
        28,
        3969,
    )
    assert "J=2 L=8 order=2" in backbone.preprocessing
    assert backbone.load_variables() == ({}, scatternet.CHECKPOINT_SHA256)
    assert backbones.handcrafted_sha256("scatternet") == scatternet.CHECKPOINT_SHA256
    assert backbones.handcrafted_sha256("efficientnet_lite0") is None
    with pytest.raises(ValueError, match="image_size 28.*not 32.*set image_size: 28"):
        backbone.load_variables(32)
    with pytest.raises(ValueError, match="float32 only.*extraction.dtype"):
        backbones.get_backbone("scatternet", dtype="bfloat16")
    with pytest.raises(ValueError, match="handcrafted and has no checkpoint file"):
        backbones.checkpoint_path("scatternet")


def test_classify_checks_the_descriptor_sha256():
    from pipeline_lib.classify import checkpoint_sha256

    assert checkpoint_sha256("scatternet", {}) == scatternet.CHECKPOINT_SHA256


@pytest.mark.skipif(not FMNIST.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_extraction_of_fashion_mnist_matches_kymatio(tmp_path):
    import zarr

    from pipeline_lib.data import load_dataset
    from pipeline_lib.features.extract import extract_to_store

    data = load_dataset("fashion_mnist", "train", max_examples=40)
    path = tmp_path / "train.zarr"
    stats = extract_to_store(
        data,
        backbone_name="scatternet",
        out_path=path,
        image_size=28,
        batch_size=16,
        chunk_rows=32,
        progress=False,
    )
    assert stats["chunks_done"] == 2
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    assert attrs["backbone"] == "scatternet"
    assert attrs["checkpoint_sha256"] == scatternet.CHECKPOINT_SHA256
    assert attrs["image_size"] == 28
    assert "J=2 L=8 order=2" in attrs["preprocessing"]
    features, labels = group["features"][:], group["labels"][:]
    assert features.shape == (40, 3969)
    images, want_labels = data.read(0, 40)
    np.testing.assert_array_equal(labels, want_labels)
    want = _reference(np.asarray(images, np.float32).reshape(40, 28, 28) / 255.0)
    assert np.abs(features - want.reshape(40, -1)).max() <= TOLERANCE
