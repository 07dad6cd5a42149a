"""ViTs in timm naming (``.safetensors``): AugReg, DINOv2 with registers and LayerScale,
OpenAI CLIP (pre-norm, QuickGELU, no patch bias) and SigLIP (MAP head). Each test writes
a tiny file in timm's names and torch layouts and compares the backbone's features with
an independent NumPy forward pass over the torch-layout weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from pipeline_lib.backbones import CheckpointMismatchError, get_backbone

D, DEPTH, MLP, HEADS, P, SIZE = 64, 2, 128, 2, 4, 32  # the "tiny/4" variant at 32 px
N = (SIZE // P) ** 2


def linear(rng, out_dim, in_dim, prefix, sd, bias=True):
    sd[f"{prefix}.weight"] = rng.normal(0, 1 / math.sqrt(in_dim), (out_dim, in_dim))
    if bias:
        sd[f"{prefix}.bias"] = rng.normal(0, 0.2, (out_dim,))


def norm(rng, prefix, sd):
    sd[f"{prefix}.weight"] = 1 + rng.normal(0, 0.2, (D,))
    sd[f"{prefix}.bias"] = rng.normal(0, 0.2, (D,))


def timm_state_dict(family: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    sd["patch_embed.proj.weight"] = rng.normal(0, 1 / math.sqrt(3 * P * P), (D, 3, P, P))
    if family != "openai_clip":
        sd["patch_embed.proj.bias"] = rng.normal(0, 0.2, (D,))
    if family != "siglip":
        sd["cls_token"] = rng.normal(0, 0.3, (1, 1, D))
    if family == "dinov2":
        sd["reg_token"] = rng.normal(0, 0.3, (1, 4, D))
    extra = 1 if family in ("augreg", "openai_clip") else 0  # pos_embed covers [cls]
    sd["pos_embed"] = rng.normal(0, 0.3, (1, extra + N, D))
    if family == "openai_clip":
        norm(rng, "norm_pre", sd)
    for i in range(DEPTH):
        b = f"blocks.{i}"
        norm(rng, f"{b}.norm1", sd)
        linear(rng, 3 * D, D, f"{b}.attn.qkv", sd)
        linear(rng, D, D, f"{b}.attn.proj", sd)
        norm(rng, f"{b}.norm2", sd)
        linear(rng, MLP, D, f"{b}.mlp.fc1", sd)
        linear(rng, D, MLP, f"{b}.mlp.fc2", sd)
        if family == "dinov2":
            sd[f"{b}.ls1.gamma"] = rng.normal(0.5, 0.2, (D,))
            sd[f"{b}.ls2.gamma"] = rng.normal(0.5, 0.2, (D,))
    norm(rng, "norm", sd)
    if family == "siglip":
        sd["attn_pool.latent"] = rng.normal(0, 0.3, (1, 1, D))
        linear(rng, D, D, "attn_pool.q", sd)
        linear(rng, 2 * D, D, "attn_pool.kv", sd)
        linear(rng, D, D, "attn_pool.proj", sd)
        norm(rng, "attn_pool.norm", sd)
        linear(rng, MLP, D, "attn_pool.mlp.fc1", sd)
        linear(rng, D, MLP, "attn_pool.mlp.fc2", sd)
    if family in ("augreg", "openai_clip"):
        linear(rng, 10, D, "head", sd)
    return {k: v.astype(np.float32) for k, v in sd.items()}


# An independent NumPy forward pass in timm's layout (float64).

ACT = {
    "augreg": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    "dinov2": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    "openai_clip": lambda x: x / (1 + np.exp(-1.702 * x)),
    "siglip": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
}
EPS = {"augreg": 1e-6, "dinov2": 1e-6, "openai_clip": 1e-5, "siglip": 1e-6}
MEAN_STD = {
    "augreg": ((0.5,) * 3, (0.5,) * 3),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "openai_clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5,) * 3, (0.5,) * 3),
}


def numpy_timm(sd, family, raw):
    p = {k: v.astype(np.float64) for k, v in sd.items()}
    act, eps = ACT[family], EPS[family]
    mean, std = (np.array(v) for v in MEAN_STD[family])

    def ln(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p[f"{prefix}.weight"] + p[f"{prefix}.bias"]

    def lin(x, prefix):
        y = x @ p[f"{prefix}.weight"].T
        return y + p[f"{prefix}.bias"] if f"{prefix}.bias" in p else y

    def heads(x):  # (n, l, D) -> (n, H, l, hd)
        n, length, _ = x.shape
        return x.reshape(n, length, HEADS, -1).transpose(0, 2, 1, 3)

    def attend(q, k, v):
        a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        y = a @ v
        return y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)

    x = (raw / 255.0 - mean) / std  # NHWC
    n, g = x.shape[0], SIZE // P
    x = x.transpose(0, 3, 1, 2)  # NCHW, as torch
    patches = x.reshape(n, 3, g, P, g, P).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    x = patches @ p["patch_embed.proj.weight"].reshape(D, -1).T
    if "patch_embed.proj.bias" in p:
        x = x + p["patch_embed.proj.bias"]
    prefix = [p[k].repeat(n, 0) for k in ("cls_token", "reg_token") if k in p]
    if p["pos_embed"].shape[1] == N:  # no_embed_class: add, then concatenate
        x = np.concatenate([*prefix, x + p["pos_embed"]], axis=1)
    else:  # concatenate, then add
        x = np.concatenate([*prefix, x], axis=1) + p["pos_embed"]
    if "norm_pre.weight" in p:
        x = ln(x, "norm_pre")
    for i in range(DEPTH):
        b = f"blocks.{i}"
        qkv = lin(ln(x, f"{b}.norm1"), f"{b}.attn.qkv")
        q, k, v = (heads(t) for t in np.split(qkv, 3, axis=-1))
        y = lin(attend(q, k, v), f"{b}.attn.proj")
        x = x + (y * p[f"{b}.ls1.gamma"] if f"{b}.ls1.gamma" in p else y)
        y = lin(act(lin(ln(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        x = x + (y * p[f"{b}.ls2.gamma"] if f"{b}.ls2.gamma" in p else y)
    x = ln(x, "norm")
    if "attn_pool.latent" in p:
        q = heads(lin(p["attn_pool.latent"].repeat(n, 0), "attn_pool.q"))
        k, v = (heads(t) for t in np.split(lin(x, "attn_pool.kv"), 2, axis=-1))
        y = lin(attend(q, k, v), "attn_pool.proj")
        y = y + lin(act(lin(ln(y, "attn_pool.norm"), "attn_pool.mlp.fc1")), "attn_pool.mlp.fc2")
        return y[:, 0]
    return x[:, 0]


def images(n=2, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


def spec(path, family, **extra):
    return {
        "model": "vit",
        "variant": "tiny/4",
        "checkpoint": str(path),
        "image_size": SIZE,
        "family": family,
        **extra,
    }


@pytest.mark.parametrize("family", ["augreg", "dinov2", "openai_clip", "siglip"])
def test_timm_family_matches_numpy_forward(tmp_path, family):
    sd = timm_state_dict(family)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    backbone = get_backbone("v", spec=spec(path, family))
    config = backbone.module.config
    assert config.num_registers == (4 if family == "dinov2" else 0)
    assert config.layer_scale == (family == "dinov2")
    assert config.pre_norm == (family == "openai_clip")
    assert config.pool == ("map" if family == "siglip" else "tok")
    variables, _ = backbone.load_variables()
    raw = images()
    out = backbone.module.apply(variables, backbone.preprocess(raw))
    expected = numpy_timm(sd, family, raw)
    assert np.std(expected) > 0.05
    np.testing.assert_allclose(out["pre_logits"], expected, atol=1e-4, rtol=1e-4)


def test_safetensors_needs_a_family_and_reports_file_names(tmp_path):
    sd = timm_state_dict("augreg")
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"backbones.v.family is needed .* \['augreg'"):
        get_backbone("v", spec=spec(path, None))
    with pytest.raises(ValueError, match="whose checkpoints are .npz files"):
        get_backbone("v", spec=spec(path, "big_vision"))
    sd["blocks.1.mlp.fc1.weight"] = np.zeros((99, D), np.float32)
    del sd["blocks.0.norm2.bias"]
    save_file(sd, str(path))
    backbone = get_backbone("v", spec=spec(path, "augreg"))
    with pytest.raises(CheckpointMismatchError) as info:
        backbone.load_variables()
    message = str(info.value)
    assert "mis-shaped: blocks.1.mlp.fc1.weight (99, 64)" in message
    assert "1 missing, 0 unexpected, 1 mis-shaped" in message


def test_fused_qkv_is_listed_once(tmp_path):
    sd = timm_state_dict("augreg")
    sd["blocks.0.attn.qkv.weight"] = np.zeros((3 * 96, D), np.float32)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        get_backbone("v", spec=spec(path, "augreg")).load_variables()
    message = str(info.value)
    assert message.count("blocks.0.attn.qkv.weight") == 1
    assert "0 missing, 0 unexpected, 1 mis-shaped" in message
