"""Each family's preprocessing, pinned against the upstream definition written out here:
TF2 ``tf.image.resize`` bilinear without antialiasing (half-pixel centres, clamped edges)
then ``tf.cast`` to uint8 for big_vision; torchvision ``Resize(int)`` + ``CenterCrop`` on
Pillow images for timm, OpenAI CLIP and DINOv2; and the constants of each family."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pipeline_lib.backbones import get_backbone, matmul_precision
from pipeline_lib.backbones.preprocessing import PRESETS, Preprocessing, resized_shape
from pipeline_lib.features import extract
from pipeline_lib.features import pipeline as pipe


def tf_bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF2 bilinear resize, pixel by pixel in float64: source coordinate
    (i + 0.5) * in / out - 0.5, neighbours floor and floor + 1 clamped to the image."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((out_h, out_w, image.shape[2]))
    for i in range(out_h):
        y = (i + 0.5) * in_h / out_h - 0.5
        y0 = math.floor(y)
        fy = y - y0
        for j in range(out_w):
            x = (j + 0.5) * in_w / out_w - 0.5
            x0 = math.floor(x)
            fx = x - x0

            def px(r, c):
                return image[min(max(r, 0), in_h - 1), min(max(c, 0), in_w - 1)].astype(float)

            out[i, j] = (
                px(y0, x0) * (1 - fy) * (1 - fx)
                + px(y0, x0 + 1) * (1 - fy) * fx
                + px(y0 + 1, x0) * fy * (1 - fx)
                + px(y0 + 1, x0 + 1) * fy * fx
            )
    return out


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(28, 28, 16), (28, 28, 32), (40, 30, 20), (9, 13, 6)])
def test_big_vision_resize_is_tf_bilinear_without_antialiasing(shape):
    h, w, size = shape
    image = random_image(h, w)
    reference = tf_bilinear_reference(image, size, size)
    vit_jax = PRESETS["vit_jax"]  # the same resize, kept in float
    host = vit_jax.resize_host(image, size)
    device = np.asarray(vit_jax.resize_device(jnp.asarray(image[None], jnp.float32), size))[0]
    np.testing.assert_allclose(host, reference, atol=1e-4)
    np.testing.assert_allclose(device, reference, atol=1e-4)
    # big_vision casts back to uint8 (truncation), then maps [0, 255] to [-1, 1].
    big_vision = PRESETS["big_vision"]
    truncated = np.floor(reference)
    clear = np.abs(reference - np.round(reference)) > 1e-3  # away from integer boundaries
    for got in (
        big_vision.resize_host(image, size),
        np.asarray(big_vision.resize_device(jnp.asarray(image[None], jnp.float32), size))[0],
    ):
        np.testing.assert_array_equal(np.asarray(got, float)[clear], truncated[clear])
    model_input = np.asarray(big_vision.normalize(big_vision.resize_host(image, size)[None]))[0]
    np.testing.assert_allclose(model_input[clear], truncated[clear] / 127.5 - 1, atol=1e-6)


def test_antialiasing_matters_when_downsampling():
    image = random_image(64, 64, seed=3)
    plain = PRESETS["vit_jax"].resize_host(image, 16)
    smoothed = Preprocessing(name="x", resize_method="bilinear", antialias=True).resize_host(
        image, 16
    )
    assert np.abs(plain - smoothed).mean() > 5  # pixel units: not a rounding difference


@pytest.mark.parametrize(
    "preset, mean, std, crop",
    [
        ("timm_inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9),
        (
            "openai_clip",
            (0.48145466, 0.4578275, 0.40821073),
            (0.26862954, 0.26130258, 0.27577711),
            1.0,
        ),
        ("dinov2", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875),
    ],
)
def test_pillow_families_follow_torchvision_resize_and_center_crop(preset, mean, std, crop):
    prep = PRESETS[preset]
    assert prep.resize_method == "bicubic" and prep.antialias and prep.crop_fraction == crop
    image = random_image(40, 60, seed=1)
    size = 32
    # torchvision Resize(int(size / crop)) on the shorter side, Pillow bicubic; CenterCrop.
    short = math.floor(size / crop)
    new_w = int(short * 60 / 40)
    resized = np.asarray(Image.fromarray(image).resize((new_w, short), Image.Resampling.BICUBIC))
    top, left = int(round((short - size) / 2)), int(round((new_w - size) / 2))
    cropped = resized[top : top + size, left : left + size].astype(np.float64)
    expected = (cropped / 255 - np.array(mean)) / np.array(std)
    got = np.asarray(prep.normalize(prep.resize_host(image, size)[None]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Portrait images crop the other axis.
    assert resized_shape(60, 40, size, prep) == (int(short * 60 / 40), short)


def test_dinov2_eval_sizes_are_256_then_224():
    assert resized_shape(480, 640, 224, PRESETS["dinov2"]) == (256, 341)


def test_device_path_of_pillow_families_is_close_to_pillow():
    prep = PRESETS["openai_clip"]
    image = random_image(48, 48, seed=2)
    host = prep.resize_host(image, 32).astype(float)
    device = np.asarray(prep.resize_device(jnp.asarray(image[None], jnp.float32), 32))[0]
    assert np.abs(host - device).mean() < 1.5  # Pillow rounds between its passes


def test_to_model_input_and_host_batches_follow_the_backbone():
    images = np.stack([random_image(28, 28, seed=s)[..., 0] for s in range(2)])  # grey
    bv = PRESETS["big_vision"]
    out = np.asarray(jax.jit(lambda x: extract.to_model_input(x, 16, bv))(images))
    assert out.shape == (2, 16, 16, 3)
    reference = np.floor(tf_bilinear_reference(images[0][..., None], 16, 16))[..., 0]
    clear = np.abs(reference - np.round(reference)) > 1e-3
    np.testing.assert_array_equal(out[0, ..., 1][clear], reference[clear])
    host = pipe.resize_image(random_image(20, 30), 16, PRESETS["vit_jax"])
    assert host.dtype == np.float32 and host.shape == (16, 16, 3)


def test_store_attrs_record_preprocessing_and_precision(tmp_path):
    class Source:
        name, split, source, num_classes = "d", "train", "fashion_mnist", 10
        image_shape = (28, 28)

    backbone = get_backbone("efficientnet_lite0")
    settings = extract.ExtractionSettings()
    attrs = extract.store_attrs(Source(), backbone, "0" * 64, 64, settings)
    assert attrs["preprocessing_spec"]["name"] == "efficientnet_lite"
    assert attrs["preprocessing_spec"]["antialias"] is True
    assert "on the device" in attrs["preprocessing"]
    assert attrs["matmul_precision"] == "highest"
    assert matmul_precision("bfloat16") == "default"
