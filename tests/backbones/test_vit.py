"""ViT: variants, big_vision parameter names, the forward pass against an independent numpy
implementation, checkpoints in both published layouts, strict matching, position-embedding
resampling, and the registry entry built from a config spec."""

from __future__ import annotations

import hashlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import traverse_util
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.backbones import CheckpointMismatchError, get_backbone, vit
from pipeline_lib.backbones.checkpoints import save_npz

SIZE = 32  # tiny/4 at 32 px: an 8x8 grid of patches.


def tiny_config(**head) -> vit.ViTConfig:
    head = {"pool": "tok", "representation_size": 64, "num_classes": 10, **head}
    return vit.get_config("tiny/4", image_size=SIZE, **head)


def random_flat_params(config: vit.ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters with non-trivial values everywhere (biases, norms, cls, head)."""
    rng = np.random.default_rng(seed)
    shapes = vit.expected_param_shapes(config)
    flat = {}
    for name, shape in sorted(shapes.items()):
        scale = 1.0 / math.sqrt(shape[0]) if name.endswith("kernel") and len(shape) > 1 else 0.2
        if name == "embedding/kernel":
            scale = 1.0 / math.sqrt(np.prod(shape[:3]))
        value = rng.normal(0.0, scale, shape)
        if name.endswith("scale"):
            value = 1.0 + value
        flat[name] = value.astype(np.float32)
    return flat


def save_big_vision(path, flat: dict[str, np.ndarray]) -> str:
    """An .npz exactly as big_vision writes it: one member per "/"-joined parameter name."""
    np.savez(path, **flat)
    return str(path)


_OLD_BLOCK_NAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


def to_old_layout(flat: dict[str, np.ndarray], pe_cls: np.ndarray) -> dict[str, np.ndarray]:
    """The same network in google-research/vision_transformer's layout: the position
    embedding inside the Transformer with a [cls] entry prepended (so the stored cls is
    the big_vision cls minus that entry), and pre-Linen numbering inside blocks."""
    old = {}
    for name, value in flat.items():
        parts = name.split("/")
        if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = _OLD_BLOCK_NAMES[parts[2]]
        old["/".join(parts)] = value
    pe = old.pop("pos_embedding")
    if "cls" in old:
        old["cls"] = old["cls"] - pe_cls
        pe = np.concatenate([pe_cls, pe], axis=1)
    old["Transformer/posembed_input/pos_embedding"] = pe
    return old


def variables_of(flat):
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def images(n=3, size=SIZE, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


# An independent numpy implementation of the forward pass (float64).


def _layer_norm(x, p, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p[f"{prefix}/scale"] + p[f"{prefix}/bias"]


def _gelu(x):  # tanh approximation, as flax.linen.gelu by default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _attention(q_in, kv_in, p, prefix):
    def proj(x, what):
        return (
            np.einsum("nld,dhk->nlhk", x, p[f"{prefix}/{what}/kernel"]) + p[f"{prefix}/{what}/bias"]
        )

    q, k, v = proj(q_in, "query"), proj(kv_in, "key"), proj(kv_in, "value")
    logits = np.einsum("nqhk,nmhk->nhqm", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("nhqm,nmhk->nqhk", weights, v)
    return np.einsum("nqhk,hkd->nqd", y, p[f"{prefix}/out/kernel"]) + p[f"{prefix}/out/bias"]


def _mlp(x, p, prefix):
    h = _gelu(x @ p[f"{prefix}/Dense_0/kernel"] + p[f"{prefix}/Dense_0/bias"])
    return h @ p[f"{prefix}/Dense_1/kernel"] + p[f"{prefix}/Dense_1/bias"]


def numpy_vit(flat, config, raw_images):
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    x = np.asarray(raw_images, np.float64) / 127.5 - 1.0
    n, size, _, _ = x.shape
    ps, g = config.patch_size, size // config.patch_size
    patches = x.reshape(n, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
    x = patches @ p["embedding/kernel"].reshape(-1, config.width) + p["embedding/bias"]
    x = x + p["pos_embedding"]
    if config.pool == "tok":
        x = np.concatenate([np.broadcast_to(p["cls"], (n, 1, config.width)), x], axis=1)
    for i in range(config.depth):
        b = f"Transformer/encoderblock_{i}"
        y = _layer_norm(x, p, f"{b}/LayerNorm_0")
        x = x + _attention(y, y, p, f"{b}/MultiHeadDotProductAttention_0")
        x = x + _mlp(_layer_norm(x, p, f"{b}/LayerNorm_1"), p, f"{b}/MlpBlock_0")
    x = _layer_norm(x, p, "Transformer/encoder_norm")
    if config.pool == "tok":
        x = x[:, 0]
    elif config.pool == "gap":
        x = x.mean(1)
    elif config.pool == "0":
        x = x[:, 0]
    else:
        probe = np.broadcast_to(p["MAPHead_0/probe"], (n, 1, config.width))
        y = _attention(probe, x, p, "MAPHead_0/MultiHeadDotProductAttention_0")
        x = (y + _mlp(_layer_norm(y, p, "MAPHead_0/LayerNorm_0"), p, "MAPHead_0/MlpBlock_0"))[:, 0]
    if config.representation_size:
        x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    logits = x @ p["head/kernel"] + p["head/bias"] if config.num_classes else None
    return x, logits


# Variants and names.


def test_variants_follow_big_vision():
    b16 = vit.get_config("B/16")
    assert (b16.width, b16.depth, b16.mlp_dim, b16.num_heads, b16.patch_size) == (
        768,
        12,
        3072,
        12,
        16,
    )
    assert b16.image_size == 224 and b16.grid_size() == 14
    assert vit.VARIANTS["Ti"] == (192, 12, 768, 3)
    assert vit.VARIANTS["S"] == (384, 12, 1536, 6)
    assert vit.VARIANTS["L"] == (1024, 24, 4096, 16)
    assert vit.VARIANTS["H"] == (1280, 32, 5120, 16)
    assert vit.VARIANTS["g"] == (1408, 40, 6144, 16)
    assert vit.VARIANTS["G"] == (1664, 48, 8192, 16)
    assert vit.get_config("S/32").patch_size == 32
    assert vit.get_config("L/14", image_size=518).grid_size() == 37
    for bad in ("B", "X/16", "B/x", "b/16"):
        with pytest.raises(ValueError, match="unknown ViT variant"):
            vit.get_config(bad)


def test_parameter_names_are_big_vision_names():
    names = set(vit.expected_param_shapes(tiny_config()))
    block = "Transformer/encoderblock_1/"
    for name in [
        "embedding/kernel",
        "embedding/bias",
        "pos_embedding",
        "cls",
        block + "LayerNorm_0/scale",
        block + "MultiHeadDotProductAttention_0/query/kernel",
        block + "MultiHeadDotProductAttention_0/key/bias",
        block + "MultiHeadDotProductAttention_0/value/kernel",
        block + "MultiHeadDotProductAttention_0/out/kernel",
        block + "LayerNorm_1/bias",
        block + "MlpBlock_0/Dense_0/kernel",
        block + "MlpBlock_0/Dense_1/bias",
        "Transformer/encoder_norm/scale",
        "pre_logits/kernel",
        "head/kernel",
    ]:
        assert name in names, name
    assert len(names) == 4 + 2 * 16 + 2 + 4  # stem, 2 blocks, encoder_norm, pre_logits+head
    shapes = vit.expected_param_shapes(tiny_config())
    assert shapes["embedding/kernel"] == (4, 4, 3, 64)
    assert shapes["pos_embedding"] == (1, 64, 64)
    assert shapes[block + "MultiHeadDotProductAttention_0/query/kernel"] == (64, 2, 32)
    assert shapes[block + "MultiHeadDotProductAttention_0/out/kernel"] == (2, 32, 64)
    gap = vit.expected_param_shapes(tiny_config(pool="gap", representation_size=None))
    assert "cls" not in gap and "pre_logits/kernel" not in gap
    map_names = set(vit.expected_param_shapes(tiny_config(pool="map")))
    assert {
        "MAPHead_0/probe",
        "MAPHead_0/LayerNorm_0/scale",
        "MAPHead_0/MlpBlock_0/Dense_1/bias",
    } <= map_names
    assert "MAPHead_0/MultiHeadDotProductAttention_0/query/kernel" in map_names


def test_preprocess_maps_to_minus_one_one():
    out = vit.preprocess_images(jnp.array([0.0, 127.5, 255.0]).reshape(1, 1, 3, 1).repeat(3, -1))
    np.testing.assert_allclose(np.asarray(out)[0, 0, :, 0], [-1.0, 0.0, 1.0])


# The forward pass.


@pytest.mark.parametrize(
    "head",
    [
        {"pool": "tok", "representation_size": 64, "num_classes": 10},
        {"pool": "gap", "representation_size": None, "num_classes": 7},
        {"pool": "map", "representation_size": 48, "num_classes": None},
    ],
    ids=["tok+pre_logits", "gap", "map"],
)
def test_forward_matches_numpy_reference(head):
    config = tiny_config(**head)
    flat = random_flat_params(config)
    raw = images()
    out = vit.ViT(config).apply(variables_of(flat), vit.preprocess_images(raw))
    features, logits = numpy_vit(flat, config, raw)
    assert out["pre_logits"].dtype == jnp.float32
    assert out["pre_logits"].shape == (3, config.feature_dim)
    np.testing.assert_allclose(out["pre_logits"], features, atol=1e-4, rtol=1e-4)
    if config.num_classes:
        np.testing.assert_allclose(out["logits"], logits, atol=1e-4, rtol=1e-4)
    else:
        assert "logits" not in out
    assert np.std(features) > 0.05  # A sensitive comparison, not of near-constant outputs.


def test_bfloat16_compute_is_close_to_float32():
    config = tiny_config()
    variables = variables_of(random_flat_params(config))
    x = vit.preprocess_images(images())
    f32 = vit.ViT(config).apply(variables, x)["pre_logits"]
    bf16 = vit.ViT(config, dtype=jnp.bfloat16).apply(variables, x)["pre_logits"]
    assert bf16.dtype == jnp.float32
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    error = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 0 < error < 0.05


def test_feature_dim_follows_the_head():
    assert tiny_config(pool="tok", representation_size=None).feature_dim == 64
    assert tiny_config(pool="gap", representation_size=None).feature_dim == 64
    assert tiny_config(pool="tok", representation_size=32).feature_dim == 32
    assert (
        tiny_config(pool="tok", representation_size=32).feature_description
        == "ViT-tiny/4 tanh(pre_logits([cls] token after encoder_norm)), 32-d"
    )
    assert "mean of the patch tokens" in tiny_config(pool="gap").feature_description
    shapes = {
        "cls": (1, 1, 64),
        "pre_logits/kernel": (64, 32),
        "head/kernel": (32, 21843),
        "embedding/kernel": (4, 4, 3, 64),
    }
    assert vit.head_config_from_shapes(shapes) == {
        "pool": "tok",
        "representation_size": 32,
        "num_classes": 21843,
    }
    with pytest.raises(ValueError, match="neither a \\[cls\\] token nor a MAP head"):
        vit.head_config_from_shapes({"embedding/kernel": (4, 4, 3, 64)})
    for pool in ("gap", "0", "none"):
        head = vit.head_config_from_shapes({"embedding/kernel": (4, 4, 3, 64)}, pool)
        assert head["pool"] == pool
    with pytest.raises(ValueError, match="pool_type is 'gap' but checkpoint .* has a \\[cls\\]"):
        vit.head_config_from_shapes({"cls": (1, 1, 64)}, "gap")
    assert vit.head_config_from_shapes({"MAPHead_0/probe": (1, 1, 64)})["pool"] == "map"
    assert vit.head_config_from_shapes({"params/cls": (1, 1, 64)})["pool"] == "tok"


# Checkpoints.


def test_big_vision_checkpoint_loads_exactly(tmp_path):
    config = tiny_config()
    flat = random_flat_params(config)
    path = save_big_vision(tmp_path / "tiny.npz", flat)
    variables = vit.load_variables(path, config)
    loaded = {"/".join(k): v for k, v in traverse_util.flatten_dict(variables["params"]).items()}
    assert loaded.keys() == flat.keys()
    for name in flat:
        np.testing.assert_array_equal(loaded[name], flat[name], err_msg=name)


def test_full_checkpoint_with_params_prefix_loads(tmp_path):
    config = tiny_config()
    flat = random_flat_params(config)
    path = save_big_vision(tmp_path / "ckpt.npz", {f"params/{k}": v for k, v in flat.items()})
    variables = vit.load_variables(path, config)
    np.testing.assert_array_equal(variables["params"]["cls"], flat["cls"])


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_old_vision_transformer_layout_gives_the_same_features(tmp_path, pool):
    config = tiny_config(pool=pool)
    flat = random_flat_params(config)
    pe_cls = np.random.default_rng(5).normal(0, 0.3, (1, 1, 64)).astype(np.float32)
    old = to_old_layout(flat, pe_cls)
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in old
    assert old["Transformer/posembed_input/pos_embedding"].shape[1] == 64 + (pool == "tok")
    path = save_big_vision(tmp_path / "old.npz", old)
    variables = vit.load_variables(path, config)
    x = vit.preprocess_images(images())
    expected = vit.ViT(config).apply(variables_of(flat), x)["pre_logits"]
    got = vit.ViT(config).apply(variables, x)["pre_logits"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_inlined_map_head_of_early_checkpoints_is_moved_under_maphead(tmp_path):
    config = tiny_config(pool="map", representation_size=None, num_classes=None)
    flat = random_flat_params(config)
    inlined = {k.removeprefix("MAPHead_0/"): v for k, v in flat.items()}
    assert "probe" in inlined and "MlpBlock_0/Dense_0/kernel" in inlined
    assert vit.head_config_from_shapes({k: v.shape for k, v in inlined.items()})["pool"] == "map"
    variables = vit.load_variables(save_big_vision(tmp_path / "g.npz", inlined), config)
    np.testing.assert_array_equal(
        variables["params"]["MAPHead_0"]["probe"], flat["MAPHead_0/probe"]
    )


def test_random_variables_round_trip_through_save_npz(tmp_path):
    config = tiny_config()
    variables = vit.random_variables(config, seed=3)
    path = tmp_path / "random.npz"
    save_npz(path, variables["params"])
    loaded = vit.load_variables(str(path), config)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_strict_matching_lists_every_problem_in_one_error(tmp_path):
    config = tiny_config()
    flat = random_flat_params(config)
    del flat["Transformer/encoderblock_1/LayerNorm_0/scale"]
    del flat["head/bias"]
    flat["Transformer/encoderblock_1/extra/kernel"] = np.zeros((3, 3), np.float32)
    flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] = np.zeros((64, 99), np.float32)
    path = save_big_vision(tmp_path / "broken.npz", flat)
    with pytest.raises(CheckpointMismatchError) as info:
        vit.load_variables(path, config)
    message = str(info.value)
    assert path in message
    assert "2 missing, 1 unexpected, 1 mis-shaped" in message
    assert "missing: Transformer/encoderblock_1/LayerNorm_0/scale (64,)" in message
    assert "missing: head/bias (10,)" in message
    assert "unexpected: Transformer/encoderblock_1/extra/kernel (3, 3)" in message
    assert (
        "mis-shaped: Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: "
        "checkpoint (64, 99), model (64, 128)" in message
    )


def test_a_checkpoint_of_another_variant_is_named_in_the_error(tmp_path):
    flat = random_flat_params(tiny_config())
    path = save_big_vision(tmp_path / "tiny.npz", flat)
    other = vit.get_config(
        "Ti/4", image_size=SIZE, pool="tok", representation_size=64, num_classes=10
    )
    with pytest.raises(CheckpointMismatchError) as info:
        vit.load_variables(path, other)
    message = str(info.value)
    assert "ViT-Ti/4 (width 192, depth 12" in message
    assert "the checkpoint has width 64, patch 4, depth 2, MLP 128, 2 heads" in message
    assert "missing: Transformer/encoderblock_11/LayerNorm_0/scale" in message


def test_a_checkpoint_at_another_resolution_fails_unless_configured(tmp_path):
    config = tiny_config()
    flat = random_flat_params(vit.get_config("tiny/4", image_size=48, pool="tok"))
    flat.update({k: v for k, v in random_flat_params(config).items() if k.startswith("head")})
    flat.update({k: v for k, v in random_flat_params(config).items() if "pre_logits" in k})
    path = save_big_vision(tmp_path / "hires.npz", flat)
    with pytest.raises(CheckpointMismatchError) as info:
        vit.load_variables(path, config)
    assert "1 mis-shaped" in str(info.value)
    assert "pos_embedding: checkpoint (1, 144, 64), model (1, 64, 64)" in str(info.value)
    assert "set image_size: 48" in str(info.value)
    hires = vit.get_config(
        "tiny/4", image_size=48, pool="tok", representation_size=64, num_classes=10
    )
    variables = vit.load_variables(path, hires, image_size=SIZE)  # Back down to 32 px.
    assert variables["params"]["pos_embedding"].shape == (1, 64, 64)


# Position-embedding resampling.


def test_resample_same_size_is_identity():
    pe = np.random.default_rng(0).normal(size=(1, 49, 8)).astype(np.float32)
    assert vit.resample_posemb(pe, 7) is pe


def test_resample_is_bilinear_with_corners_aligned():
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(1, 49, 5)).astype(np.float32)
    for new in (3, 10, 12, 24):
        out = vit.resample_posemb(pe, new)
        assert out.shape == (1, new * new, 5) and out.dtype == np.float32
        reference = scipy.ndimage.zoom(pe.reshape(7, 7, 5), (new / 7, new / 7, 1), order=1)
        np.testing.assert_allclose(out.reshape(new, new, 5), reference, atol=1e-5)
    # Bilinear interpolation reproduces affine functions of the grid position exactly.
    i, j = np.meshgrid(np.arange(7), np.arange(7), indexing="ij")
    affine = np.stack([i, j, 2 * i - 3 * j + 1], -1).reshape(1, 49, 3).astype(np.float32)
    out = vit.resample_posemb(affine, 13).reshape(13, 13, 3)
    u = np.linspace(0, 6, 13)
    np.testing.assert_allclose(out[:, :, 0], np.broadcast_to(u[:, None], (13, 13)), atol=1e-5)
    np.testing.assert_allclose(out[:, :, 1], np.broadcast_to(u[None, :], (13, 13)), atol=1e-5)
    np.testing.assert_allclose(out[:, :, 2], 2 * out[:, :, 0] - 3 * out[:, :, 1] + 1, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    old=st.integers(1, 9),
    new=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_resampling_is_a_convex_combination(old, new, seed):
    """Every output entry lies within the range of its channel's inputs, and constant
    embeddings stay constant."""
    pe = np.random.default_rng(seed).normal(size=(1, old * old, 3))
    out = vit.resample_posemb(pe, new)
    assert out.shape == (1, new * new, 3)
    assert np.all(out >= pe.min(axis=1, keepdims=True) - 1e-12)
    assert np.all(out <= pe.max(axis=1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(vit.resample_posemb(np.full((1, old * old, 2), 0.7), new), 0.7)


def test_load_variables_resamples_to_the_requested_size(tmp_path):
    config = tiny_config()
    flat = random_flat_params(config)
    path = save_big_vision(tmp_path / "tiny.npz", flat)
    same = vit.load_variables(path, config, image_size=SIZE)
    np.testing.assert_array_equal(same["params"]["pos_embedding"], flat["pos_embedding"])
    bigger = vit.load_variables(path, config, image_size=48)
    pe = bigger["params"]["pos_embedding"]
    assert pe.shape == (1, 144, 64)
    np.testing.assert_allclose(pe, vit.resample_posemb(flat["pos_embedding"], 12))
    corners = pe.reshape(12, 12, 64)[[0, 0, -1, -1], [0, -1, 0, -1]]
    original = flat["pos_embedding"].reshape(8, 8, 64)[[0, 0, -1, -1], [0, -1, 0, -1]]
    np.testing.assert_allclose(corners, original, atol=1e-6)
    out = vit.ViT(config).apply(bigger, vit.preprocess_images(images(size=48)))
    assert out["pre_logits"].shape == (3, 64)


# The registry.


def spec_for(path, **extra):
    return {
        "model": "vit",
        "variant": "tiny/4",
        "checkpoint": str(path),
        "image_size": SIZE,
        **extra,
    }


def test_get_backbone_from_a_spec_end_to_end(tmp_path):
    config = tiny_config()
    flat = random_flat_params(config)
    path = save_big_vision(tmp_path / "tiny.npz", flat)
    backbone = get_backbone("vit_tiny", spec=spec_for(path), cache_dir=str(tmp_path / "cache"))
    assert backbone.name == "vit_tiny"
    assert backbone.native_image_size == SIZE
    assert backbone.feature_dim == 64
    assert "127.5" in backbone.image_preprocessing.describe()
    assert backbone.image_preprocessing.name == "big_vision"
    variables, sha256 = backbone.load_variables()
    assert sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    raw = images()
    out = jax.jit(backbone.module.apply)(variables, backbone.preprocess(raw))
    np.testing.assert_allclose(out["pre_logits"], numpy_vit(flat, config, raw)[0], atol=1e-4)
    assert not os.path.exists(tmp_path / "cache")  # Local files are used in place.
    bf16 = get_backbone("vit_tiny", dtype="bfloat16", spec=spec_for(path))
    assert bf16.module.dtype == jnp.bfloat16
    variables48, _ = backbone.load_variables(48)
    assert variables48["params"]["pos_embedding"].shape == (1, 144, 64)


def test_get_backbone_reads_the_head_off_the_checkpoint(tmp_path):
    config = tiny_config(pool="gap", representation_size=None, num_classes=None)
    path = save_big_vision(tmp_path / "gap.npz", random_flat_params(config))
    with pytest.raises(ValueError, match="backbones.vit_gap.pool_type"):
        get_backbone("vit_gap", spec=spec_for(path))
    backbone = get_backbone("vit_gap", spec=spec_for(path, pool_type="gap"))
    assert backbone.module.config.pool == "gap"
    assert backbone.module.config.num_classes is None
    assert backbone.feature_dim == 64


def test_get_backbone_spec_errors(tmp_path):
    path = save_big_vision(tmp_path / "tiny.npz", random_flat_params(tiny_config()))
    with pytest.raises(ValueError, match=r"backbones.v: unknown key\(s\) \['pool'\]"):
        get_backbone("v", spec=spec_for(path, pool="gap"))
    with pytest.raises(ValueError, match=r"backbones.v.pool_type is 'gap' but"):
        get_backbone("v", spec=spec_for(path, pool_type="gap"))
    with pytest.raises(ValueError, match=r"backbones.v.model is 'resnet'"):
        get_backbone("v", spec={"model": "resnet"})
    with pytest.raises(ValueError, match=r"backbones.v: missing key\(s\) \['checkpoint'\]"):
        get_backbone("v", spec={"model": "vit", "variant": "B/16"})
    with pytest.raises(ValueError, match="backbones.v: unknown ViT variant 'Q/16'"):
        get_backbone("v", spec=spec_for(path, variant="Q/16"))
    with pytest.raises(FileNotFoundError, match="nope.npz does not exist"):
        get_backbone("v", spec=spec_for(tmp_path / "nope.npz"))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        get_backbone("v", spec=spec_for(path, sha256="0" * 64))
    with pytest.raises(ValueError, match="backbones.v.allow_network"):
        get_backbone("v", spec=spec_for("gs://bucket/x.npz"), cache_dir=str(tmp_path))


def test_get_backbone_efficientnet_spec_is_the_builtin():
    backbone = get_backbone("lite", spec={"model": "efficientnet_lite", "variant": "lite0"})
    assert backbone.name == "lite"
    assert backbone.feature_dim == 1280 and backbone.native_image_size == 224


# big_vision variants, two-tower files, pool types, hints and precision.


def test_newer_big_vision_variants():
    assert vit.VARIANTS["mu"] == (32, 1, 128, 2)
    assert vit.VARIANTS["So400m"] == (1152, 27, 4304, 16)
    assert vit.VARIANTS["g-opt"] == (1536, 40, 6144, 16)
    assert vit.VARIANTS["G-opt"] == (1536, 48, 8192, 16)
    assert vit.VARIANTS["e"] == (1792, 56, 15360, 16)
    assert vit.get_config("So400m/14", image_size=224).grid_size() == 16
    assert vit.get_config("g-opt/14", image_size=224).width == 1536
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        vit.get_config("So400m/14", image_size=225)


def test_siglip_two_tower_file_loads_its_image_tower(tmp_path):
    config = vit.get_config("mu/4", image_size=SIZE, pool="map", num_classes=16)
    flat = random_flat_params(config)
    two_tower = {f"params/img/{k}": v for k, v in flat.items()}
    two_tower["params/txt/Embed_0/embedding"] = np.zeros((100, 32), np.float32)
    two_tower["params/t"] = np.ones((1,), np.float32)
    two_tower["params/b"] = np.zeros((1,), np.float32)
    path = save_big_vision(tmp_path / "siglip.npz", two_tower)
    backbone = get_backbone(
        "siglip", spec={"model": "vit", "variant": "mu/4", "checkpoint": path, "image_size": SIZE}
    )
    assert backbone.module.config.pool == "map"
    assert backbone.image_preprocessing.name == "big_vision"
    variables, _ = backbone.load_variables()
    raw = images()
    out = backbone.module.apply(variables, backbone.preprocess(raw))
    np.testing.assert_allclose(out["pre_logits"], numpy_vit(flat, config, raw)[0], atol=1e-4)


@pytest.mark.parametrize("pool", ["0", "gap"])
def test_declared_pool_types_without_cls(tmp_path, pool):
    config = tiny_config(pool=pool, representation_size=None, num_classes=None)
    flat = random_flat_params(config)
    path = save_big_vision(tmp_path / "nocls.npz", flat)
    backbone = get_backbone("v", spec=spec_for(path, pool_type=pool))
    variables, _ = backbone.load_variables()
    raw = images()
    out = backbone.module.apply(variables, backbone.preprocess(raw))
    np.testing.assert_allclose(out["pre_logits"], numpy_vit(flat, config, raw)[0], atol=1e-4)
    with pytest.raises(ValueError, match="pool_type is 'none'"):
        get_backbone("v", spec=spec_for(path, pool_type="none"))
    none = vit.ViT(vit.get_config("tiny/4", image_size=SIZE, pool="none"))
    tokens = none.apply(variables, backbone.preprocess(raw))["pre_logits"]
    assert tokens.shape == (3, 64, 64)


def test_errors_say_what_the_file_looks_like_and_hint_the_patch_size(tmp_path):
    flat = random_flat_params(tiny_config())
    path = save_big_vision(tmp_path / "tiny.npz", {f"params/{k}": v for k, v in flat.items()})
    other = vit.get_config(
        "tiny/8", image_size=SIZE, pool="tok", representation_size=64, num_classes=10
    )
    with pytest.raises(CheckpointMismatchError) as info:
        vit.load_variables(path, other)
    message = str(info.value)
    assert "it looks like ViT-tiny/4 with pool_type 'tok'" in message
    assert "use variant 'tiny/4'" in message
    # Parameters are named as in the file, prefix included.
    assert "mis-shaped: params/embedding/kernel (4, 4, 3, 64)" in message


def test_old_layout_errors_use_the_file_numbering(tmp_path):
    config = tiny_config()
    flat = random_flat_params(config)
    old = to_old_layout(flat, np.zeros((1, 1, 64), np.float32))
    old["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((64, 7), np.float32)
    path = save_big_vision(tmp_path / "old.npz", old)
    with pytest.raises(CheckpointMismatchError) as info:
        vit.load_variables(path, config)
    assert "mis-shaped: Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel (64, 7)" in str(
        info.value
    )


def test_a_directory_checkpoint_gets_its_own_message(tmp_path):
    (tmp_path / "ckpt").mkdir()
    save_big_vision(tmp_path / "ckpt" / "model.npz", random_flat_params(tiny_config()))
    with pytest.raises(FileNotFoundError, match=r"is a directory .* \['model.npz'\]"):
        get_backbone("v", spec=spec_for(tmp_path / "ckpt"))


def test_vit_matmuls_use_the_declared_precision(tmp_path):
    flat = random_flat_params(tiny_config())
    path = save_big_vision(tmp_path / "tiny.npz", flat)
    for dtype, wanted in (("float32", "HIGHEST"), ("bfloat16", "DEFAULT")):
        backbone = get_backbone("v", dtype=dtype, spec=spec_for(path))
        jaxpr = jax.make_jaxpr(backbone.module.apply)(variables_of(flat), images())
        eqns = [
            e
            for e in jaxpr.jaxpr.eqns
            if e.primitive.name in ("dot_general", "conv_general_dilated")
        ]
        assert len(eqns) > 10
        for e in eqns:
            assert wanted in str(e.params["precision"]), (e.primitive.name, e.params["precision"])
