"""ViTs in timm / Hugging Face naming, read from ``.safetensors`` with NumPy (no torch).

timm's ``VisionTransformer`` state dict (the ``model.safetensors`` of the ``timm/...``
repositories on the Hugging Face hub) is renamed and re-laid-out into the big_vision
names of :mod:`pipeline_lib.backbones.vit`::

    patch_embed.proj.weight (D, 3, p, p)      embedding/kernel (p, p, 3, D)
    patch_embed.proj.bias (absent for CLIP)   embedding/bias (zeros when absent)
    cls_token (1, 1, D)                       cls
    reg_token (1, R, D)                       reg                       (DINOv2 registers)
    pos_embed (1, [1 +] N, D)                 pos_embedding, a [cls] entry folded into cls
    norm_pre                                  pre_norm                  (CLIP)
    blocks.i.norm1 / norm2                    Transformer/encoderblock_i/LayerNorm_0 / _1
    blocks.i.attn.qkv (3D, D), (3D,)          .../MultiHeadDotProductAttention_0/{query,key,value}
    blocks.i.attn.proj                        .../MultiHeadDotProductAttention_0/out
    blocks.i.ls1.gamma / ls2.gamma            .../layer_scale_0 / layer_scale_1 (DINOv2)
    blocks.i.mlp.fc1 / fc2                    .../MlpBlock_0/Dense_0 / Dense_1
    norm                                      Transformer/encoder_norm
    attn_pool.{latent,q,kv,proj,norm,mlp}     MAPHead_0/...             (SigLIP)
    head                                      head

Linear weights are (out, in) in torch and (in, out) in Flax; a fused qkv weight's rows
are [q | k | v], each head-major (heads x head_dim). What the file cannot say (the
activation, the LayerNorm epsilon, the preprocessing) comes from the family
(:data:`FAMILIES`).
"""

from __future__ import annotations

import re

import numpy as np

from pipeline_lib.backbones.checkpoints import CheckpointError

__all__ = [
    "FAMILIES",
    "convert_state_dict",
    "file_features",
    "read_safetensors",
    "read_safetensors_shapes",
]

# family -> (file format, activation, LayerNorm epsilon, default preprocessing preset).
FAMILIES: dict[str, tuple[str, str, float, str]] = {
    "big_vision": ("npz", "gelu_tanh", 1e-6, "big_vision"),
    "vit_jax": ("npz", "gelu_tanh", 1e-6, "vit_jax"),
    "augreg": ("safetensors", "gelu", 1e-6, "timm_inception"),
    "dinov2": ("safetensors", "gelu", 1e-6, "dinov2"),
    "openai_clip": ("safetensors", "quick_gelu", 1e-5, "openai_clip"),
    "open_clip": ("safetensors", "gelu", 1e-5, "openai_clip"),
    "siglip": ("safetensors", "gelu_tanh", 1e-6, "big_vision"),
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as NumPy arrays."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable .safetensors checkpoint: {e}") from e


def read_safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the header only."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable .safetensors checkpoint: {e}") from e


def file_features(shapes: dict[str, tuple[int, ...]]) -> dict:
    """What the file itself says about the architecture: registers, LayerScale, pre-norm."""
    reg = shapes.get("reg_token")
    return {
        "num_registers": int(reg[1]) if reg is not None and len(reg) == 3 else 0,
        "layer_scale": any(re.fullmatch(r"blocks\.\d+\.ls1\.gamma", k) for k in shapes),
        "pre_norm": "norm_pre.weight" in shapes,
    }


_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "norm1.weight": "LayerNorm_0/scale",
    "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale",
    "norm2.bias": "LayerNorm_1/bias",
    "attn.proj.weight": "MultiHeadDotProductAttention_0/out/kernel",
    "attn.proj.bias": "MultiHeadDotProductAttention_0/out/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel",
    "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel",
    "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
    "ls1.gamma": "layer_scale_0",
    "ls2.gamma": "layer_scale_1",
}
_TOP_NAMES = {
    "cls_token": "cls",
    "reg_token": "reg",
    "pos_embed": "pos_embedding",
    "norm_pre.weight": "pre_norm/scale",
    "norm_pre.bias": "pre_norm/bias",
    "norm.weight": "Transformer/encoder_norm/scale",
    "norm.bias": "Transformer/encoder_norm/bias",
    "head.weight": "head/kernel",
    "head.bias": "head/bias",
    "patch_embed.proj.bias": "embedding/bias",
    "attn_pool.latent": "MAPHead_0/probe",
    "attn_pool.proj.weight": "MAPHead_0/MultiHeadDotProductAttention_0/out/kernel",
    "attn_pool.proj.bias": "MAPHead_0/MultiHeadDotProductAttention_0/out/bias",
    "attn_pool.norm.weight": "MAPHead_0/LayerNorm_0/scale",
    "attn_pool.norm.bias": "MAPHead_0/LayerNorm_0/bias",
    "attn_pool.mlp.fc1.weight": "MAPHead_0/MlpBlock_0/Dense_0/kernel",
    "attn_pool.mlp.fc1.bias": "MAPHead_0/MlpBlock_0/Dense_0/bias",
    "attn_pool.mlp.fc2.weight": "MAPHead_0/MlpBlock_0/Dense_1/kernel",
    "attn_pool.mlp.fc2.bias": "MAPHead_0/MlpBlock_0/Dense_1/bias",
}


def _heads_split(w: np.ndarray, parts: int, num_heads: int) -> list[np.ndarray] | None:
    """A fused (parts*D, D) weight or (parts*D,) bias -> ``parts`` query-like Flax arrays:
    kernels (D, heads, head_dim), biases (heads, head_dim). None if it does not divide."""
    out_dim = w.shape[0]
    if out_dim % (parts * num_heads):
        return None
    head_dim = out_dim // parts // num_heads
    w = w.reshape(parts, num_heads, head_dim, *w.shape[1:])
    if w.ndim == 3:
        return list(w)
    return [np.transpose(p, (2, 0, 1)) for p in w]


def convert_state_dict(sd: dict[str, np.ndarray], num_heads: int):
    """timm ViT state dict -> ``vit.Converted`` in big_vision names, float32."""
    from pipeline_lib.backbones.vit import Converted, fold_cls_posemb

    params: dict[str, np.ndarray] = {}
    origin: dict[str, tuple[str, tuple[int, ...]]] = {}
    problems: list[str] = []

    def put(name: str, value: np.ndarray, source: str) -> None:
        params[name] = np.asarray(value, np.float32)
        origin[name] = (source, tuple(sd[source].shape))

    def put_split(prefix: str, names: tuple[str, ...], key: str, suffix: str) -> None:
        parts = _heads_split(np.asarray(sd[key]), len(names), num_heads)
        if parts is None:
            problems.append(
                f"  {key} {tuple(sd[key].shape)} does not split into {len(names)} x "
                f"{num_heads} heads"
            )
            return
        for name, part in zip(names, parts, strict=True):
            put(f"{prefix}/{name}/{suffix}", part, key)

    for key, value in sd.items():
        value = np.asarray(value)
        if key == "patch_embed.proj.weight" and value.ndim == 4:
            put("embedding/kernel", value.transpose(2, 3, 1, 0), key)
        elif key in _TOP_NAMES:
            name = _TOP_NAMES[key]
            put(name, value.T if name.endswith("kernel") and value.ndim == 2 else value, key)
        elif m := _BLOCK.match(key):
            block, rest = f"Transformer/encoderblock_{m.group(1)}", m.group(2)
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                suffix = "kernel" if rest.endswith("weight") else "bias"
                put_split(
                    f"{block}/MultiHeadDotProductAttention_0",
                    ("query", "key", "value"),
                    key,
                    suffix,
                )
            elif rest in _BLOCK_NAMES:
                name = _BLOCK_NAMES[rest]
                out = value.T if name.endswith("kernel") and value.ndim == 2 else value
                put(f"{block}/{name}", out, key)
            else:
                put(key, value, key)
        elif key in ("attn_pool.q.weight", "attn_pool.q.bias"):
            suffix = "kernel" if key.endswith("weight") else "bias"
            put_split("MAPHead_0/MultiHeadDotProductAttention_0", ("query",), key, suffix)
        elif key in ("attn_pool.kv.weight", "attn_pool.kv.bias"):
            suffix = "kernel" if key.endswith("weight") else "bias"
            put_split("MAPHead_0/MultiHeadDotProductAttention_0", ("key", "value"), key, suffix)
        else:
            put(key, value, key)  # Reported as unexpected, under its own name.
            if key.startswith("fc_norm"):
                problems.append(
                    f"  {key}: a norm after average pooling (timm global_pool='avg') is not "
                    "supported; only token, MAP and plain average pooling are"
                )
    for name in [k for k in params if k.endswith("/out/kernel")]:
        kernel = params[name]  # (heads * head_dim, D) -> (heads, head_dim, D)
        if kernel.ndim == 2 and kernel.shape[0] % num_heads == 0:
            params[name] = kernel.reshape(num_heads, -1, kernel.shape[-1])
    if "embedding/kernel" in params and "embedding/bias" not in params:
        params["embedding/bias"] = np.zeros(params["embedding/kernel"].shape[-1], np.float32)
        origin["embedding/bias"] = ("(no patch_embed.proj.bias: zeros)", (0,))
    converted = Converted(params, origin, problems)
    fold_cls_posemb(converted)
    return converted
