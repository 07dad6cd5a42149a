"""EfficientNet-Lite: layouts, strict conversion, conv implementations, golden logits."""

from __future__ import annotations

import hashlib
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.backbones import checkpoint_path, get_backbone
from pipeline_lib.backbones import efficientnet_lite as enl
from pipeline_lib.backbones.torch_legacy import load_legacy_state_dict

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
GOLDEN_TOLERANCE = 1e-4  # max abs diff on logits, against a float64 torch reference.

# Jitted once per shape: far cheaper than compiling each of the k*k eager slices.
_depthwise = jax.jit(enl.depthwise_conv, static_argnums=(2, 3))
_stem = jax.jit(enl.stem_conv, static_argnums=(2, 3))


# --- Layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,num_blocks,channels",
    [
        ("lite0", 16, (16, 24, 40, 80, 112, 192, 320)),
        ("lite1", 21, (16, 24, 40, 80, 112, 192, 320)),
        ("lite2", 21, (16, 24, 48, 88, 120, 208, 352)),
    ],
)
def test_layout(variant, num_blocks, channels):
    config = enl.get_config(variant)
    assert len(config.blocks) == num_blocks
    assert tuple(dict.fromkeys(b.out_channels for b in config.blocks)) == channels
    assert config.blocks[0].in_channels == 32 and config.head_channels == 1280
    assert sum(b.stride == 2 for b in config.blocks) == 4


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_layout_matches_checkpoint_tensors(name):
    state_dict = load_legacy_state_dict(checkpoint_path(name))
    shapes = {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert shapes == enl.expected_state_dict_shapes(enl.get_config(name.split("_")[1]))


def test_unknown_variant():
    with pytest.raises(ValueError, match="lite0"):
        enl.get_config("lite9")


# --- Strict conversion -------------------------------------------------------------------


def test_converted_tree_matches_module(lite0_state_dict):
    config = enl.get_config("lite0")
    variables = enl.convert_state_dict(lite0_state_dict, config)
    init = jax.eval_shape(
        enl.EfficientNetLite(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, init)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(variables))


def test_bn_folding_is_exact_for_one_channel(lite0_state_dict):
    sd = lite0_state_dict
    params = enl.convert_state_dict(sd, enl.get_config("lite0"))["params"]
    c = 5
    scale = sd["_bn1.weight"][c] / np.sqrt(sd["_bn1.running_var"][c] + 1e-3)
    np.testing.assert_allclose(
        params["head_conv"]["kernel"][:, c], sd["_conv_head.weight"][c, :, 0, 0] * scale, rtol=1e-6
    )
    np.testing.assert_allclose(
        params["head_conv"]["bias"][c],
        sd["_bn1.bias"][c] - sd["_bn1.running_mean"][c] * scale,
        rtol=1e-6,
    )


def test_strict_conversion_lists_every_problem_at_once(lite0_state_dict):
    sd = dict(lite0_state_dict)
    del sd["_blocks.3._bn1.running_mean"], sd["_fc.bias"]
    sd["_blocks.16._project_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    sd["_extra.weight"] = np.zeros(3, np.float32)
    sd["_conv_stem.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    sd["_blocks.0._depthwise_conv.weight"] = np.zeros((32, 3, 3), np.float32)
    with pytest.raises(enl.CheckpointMismatchError) as info:
        enl.convert_state_dict(sd, enl.get_config("lite0"), source="my.pth")
    message = str(info.value)
    assert "my.pth" in message and "2 missing, 2 unexpected, 2 mis-shaped" in message
    for line in [
        "missing: _blocks.3._bn1.running_mean (144,)",
        "missing: _fc.bias (1000,)",
        "unexpected: _blocks.16._project_conv.weight (8, 8, 1, 1)",
        "unexpected: _extra.weight (3,)",
        "mis-shaped: _conv_stem.weight: got (32, 3, 5, 5), expected (32, 3, 3, 3)",
        "mis-shaped: _blocks.0._depthwise_conv.weight: got (32, 3, 3), expected (32, 1, 3, 3)",
    ]:
        assert line in message


def test_wrong_variant_is_refused(lite0_state_dict):
    with pytest.raises(enl.CheckpointMismatchError, match=r"efficientnet_lite2 \(\d+ missing"):
        enl.convert_state_dict(lite0_state_dict, enl.get_config("lite2"))


# --- Conv implementations agree ----------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    channels=st.integers(1, 9),
    kernel_size=st.sampled_from([3, 5]),
    stride=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31),
)
def test_depthwise_impls_agree(height, width, channels, kernel_size, stride, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, height, width, channels)).astype(np.float32)
    kernel = rng.normal(size=(kernel_size, kernel_size, channels)).astype(np.float32)
    want = _depthwise(x, kernel, stride, "conv")
    assert want.shape == (2, -(-height // stride), -(-width // stride), channels)
    for impl in ("shift", "taps"):
        np.testing.assert_allclose(_depthwise(x, kernel, stride, impl), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(
    size=st.integers(1, 11),
    in_channels=st.integers(1, 4),
    stride=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31),
)
def test_stem_impls_agree(size, in_channels, stride, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, size, size + 1, in_channels)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, in_channels, 8)).astype(np.float32)
    np.testing.assert_allclose(
        _stem(x, kernel, stride, "taps"), _stem(x, kernel, stride, "conv"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("in_channels", [3, enl.THIN_CHANNELS, enl.THIN_CHANNELS + 1])
def test_pointwise_impls_agree(in_channels):
    rng = np.random.default_rng(in_channels)
    x = rng.normal(size=(2, 5, 4, in_channels)).astype(np.float32)
    kernel = rng.normal(size=(in_channels, 7)).astype(np.float32)
    np.testing.assert_allclose(
        enl.pointwise_conv(x, kernel, "taps"), x @ kernel, atol=1e-5, rtol=1e-5
    )


def test_unknown_impl():
    x = np.zeros((1, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="unknown depthwise_impl 'fft'.*conv"):
        enl.depthwise_conv(x, np.zeros((3, 3, 2), np.float32), 1, "fft")


# --- Golden logits against an independent torch reference --------------------------------


def _golden(variant: str):
    golden = np.load(GOLDEN_DIR / f"efficientnet_{variant}.npz")
    num_images, size = golden["logits"].shape[0], enl.VARIANTS[variant][2]
    images = np.random.default_rng(0).integers(
        0, 256, size=(num_images, size, size, 3), dtype=np.uint8
    )
    return golden, images


_outputs: dict[tuple[str, str], dict] = {}  # (variant, impl) -> outputs, shared by tests.


def _run(variant: str, impl: str) -> dict:
    if (variant, impl) not in _outputs:
        _, images = _golden(variant)
        backbone = get_backbone(f"efficientnet_{variant}", depthwise_impl=impl)
        variables, _ = backbone.load_variables()
        out = jax.jit(backbone.module.apply)(variables, backbone.preprocess(images))
        _outputs[variant, impl] = jax.tree.map(np.asarray, out)
    return _outputs[variant, impl]


@pytest.mark.parametrize(
    "variant,impl",
    [("lite0", impl) for impl in enl.DEPTHWISE_IMPLS] + [("lite1", "taps"), ("lite2", "taps")],
)
def test_golden_logits(variant, impl):
    golden, images = _golden(variant)
    assert hashlib.sha256(images.tobytes()).hexdigest() == str(golden["images_sha256"])
    assert (
        str(golden["checkpoint_sha256"])
        == get_backbone(f"efficientnet_{variant}").load_variables()[1]
    )
    out = _run(variant, impl)
    assert out["logits"].shape == golden["logits"].shape
    assert out["logits"].dtype == np.float32
    assert np.abs(out["logits"] - golden["logits"]).max() <= GOLDEN_TOLERANCE
    num = golden["pre_logits"].shape[1]
    assert out["pre_logits"].shape == (len(images), 1280)
    assert np.abs(out["pre_logits"][:, :num] - golden["pre_logits"]).max() <= GOLDEN_TOLERANCE


def test_default_impl_agrees_with_conv():
    default = get_backbone("efficientnet_lite0").module.depthwise_impl
    assert default in enl.DEPTHWISE_IMPLS
    diff = np.abs(_run("lite0", default)["logits"] - _run("lite0", "conv")["logits"]).max()
    assert diff <= 1e-4


def test_chunked_batches_give_the_same_outputs():
    """Sub-batching is invisible, with and without a partial last chunk (tiny network)."""
    config = enl.EfficientNetLiteConfig(
        "tiny",
        16,
        (enl.BlockConfig(3, 1, 1, 8, 8), enl.BlockConfig(5, 2, 6, 8, 16)),
        stem_channels=8,
        head_channels=32,
        num_classes=10,
    )
    x = np.random.default_rng(2).normal(size=(5, 16, 16, 3)).astype(np.float32)
    whole = enl.EfficientNetLite(config)
    rng = np.random.default_rng(3)  # Random weights; whole.init compiles slowly.
    shapes = jax.eval_shape(whole.init, jax.random.key(0), x)
    variables = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) / 4, shapes)
    want = jax.jit(whole.apply)(variables, x)
    assert np.std(want["logits"], axis=0).min() > 1e-3  # Images give different outputs.
    for chunk_pixels in (2 * 16 * 16 + 7, 5 * 16 * 16):  # 2+2+1 images; one chunk of 5
        chunked = enl.EfficientNetLite(config, chunk_pixels=chunk_pixels)
        got = jax.jit(chunked.apply)(variables, x)
        for key in ("pre_logits", "logits"):
            assert got[key].shape == want[key].shape
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)


# --- Other checks ------------------------------------------------------------------------


def test_bfloat16_compute_is_close_to_float32():
    images = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3)).astype(np.float32)
    f32 = get_backbone("efficientnet_lite0", depthwise_impl="conv")
    bf16 = get_backbone("efficientnet_lite0", dtype="bfloat16", depthwise_impl="conv")
    variables, _ = f32.load_variables()
    want = jax.jit(f32.module.apply)(variables, f32.preprocess(images))["logits"]
    got = jax.jit(bf16.module.apply)(variables, bf16.preprocess(images))["logits"]
    assert got.dtype == np.float32
    assert np.corrcoef(np.ravel(got), np.ravel(want))[0, 1] > 0.99


def test_preprocess():
    x = np.array([0.0, 127.0, 255.0], np.float32).reshape(1, 1, 3, 1).repeat(3, axis=-1)
    np.testing.assert_allclose(enl.preprocess_images(x)[0, 0, :, 0], [-127 / 128, 0, 1])
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enl.preprocess_images(np.zeros((2, 8, 8), np.float32))


def test_recognises_a_real_photo():
    """Grace Hopper (matplotlib's sample photo) in uniform: top-1 'military uniform'."""
    cbook = pytest.importorskip("matplotlib.cbook")
    import matplotlib.image

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    if not os.path.exists(path):
        pytest.skip("matplotlib sample data not installed")
    photo = matplotlib.image.imread(path).astype(np.float32)  # (600, 512, 3) in [0, 255]
    backbone = get_backbone("efficientnet_lite0")
    variables, _ = backbone.load_variables()
    x = jax.image.resize(photo[None], (1, 224, 224, 3), "bilinear")
    logits = jax.jit(backbone.module.apply)(variables, backbone.preprocess(x))["logits"]
    assert int(np.argmax(logits)) == 652  # ImageNet class 652: military uniform.
