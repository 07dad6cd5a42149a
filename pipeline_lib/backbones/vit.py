"""Vision Transformer (ViT) in Flax, for frozen-feature extraction, and its checkpoints.

Parameter names are those of big_vision's ``models/vit.py``, so its ``.npz`` checkpoints
load as they are::

    embedding/{kernel (p, p, 3, D), bias}          patch embedding (a stride-p conv)
    pos_embedding (1, h*w, D)                      learned, added before the [cls] token
    cls (1, 1, D)                                  only with token pooling
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,
        value,out}, LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
    Transformer/encoder_norm
    MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}   MAP pooling
    pre_logits/{kernel, bias}                      optional Dense + tanh "representation"
    head/{kernel, bias}                            optional classifier

The older google-research/vision_transformer layout, used by the published AugReg
checkpoints, is converted on load the way big_vision converts it: the position embedding
lived at ``Transformer/posembed_input/pos_embedding`` and included an entry for the
[cls] token (which is folded into ``cls``, an exact rewrite, since the [cls] token only
ever enters the network with its position embedding added), and modules inside an
encoder block were numbered across classes (``LayerNorm_0``,
``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``).

The feature (``pre_logits``) is the representation the checkpoint defines: the pooled
token ([cls] token if the checkpoint has ``cls``, MAP head if it has ``MAPHead_0``,
otherwise the mean over patch tokens), followed by ``tanh(pre_logits(x))`` when the
checkpoint has a ``pre_logits`` layer. ``head_config_from_shapes`` reads that off the
checkpoint's parameter names; nothing else is inferred: the variant (width, depth, MLP
size, heads, patch) is given, and a checkpoint that disagrees fails the strict check.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pipeline_lib.backbones.checkpoints import (
    CheckpointMismatchError,
    match_parameters,
    read_npz,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "POOL_TYPES",
    "PREPROCESSING",
    "VARIANTS",
    "ViT",
    "ViTConfig",
    "convert_checkpoint",
    "expected_param_shapes",
    "get_config",
    "head_config_from_shapes",
    "load_variables",
    "preprocess_images",
    "random_variables",
    "resample_posemb",
]

DEFAULT_IMAGE_SIZE = 224
PREPROCESSING = "x / 127.5 - 1 on float RGB in [0, 255] (to [-1, 1]), NHWC"
POOL_TYPES = ("tok", "gap", "map")

# name -> (width, depth, mlp_dim, num_heads); big_vision's decode_variant (from Table 2 of
# arXiv 2106.04560), plus "tiny" for tests.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """A ViT architecture. ``image_size`` is the native (pre-training) resolution."""

    variant: str
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int = DEFAULT_IMAGE_SIZE
    pool: str = "tok"
    representation_size: int | None = None
    num_classes: int | None = None

    def __post_init__(self):
        if self.pool not in POOL_TYPES:
            raise ValueError(f"unknown ViT pool {self.pool!r}; choose one of {POOL_TYPES}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} < patch size {self.patch_size}")

    @property
    def feature_dim(self) -> int:
        return self.representation_size or self.width

    @property
    def feature_description(self) -> str:
        """What ``pre_logits`` is, in words (for logs and store attributes)."""
        pooled = {
            "tok": "[cls] token after encoder_norm",
            "gap": "mean of the patch tokens after encoder_norm",
            "map": "MAP-head (attention-pooled) token",
        }[self.pool]
        if self.representation_size:
            pooled = f"tanh(pre_logits({pooled}))"
        return f"ViT-{self.variant} {pooled}, {self.feature_dim}-d"

    def grid_size(self, image_size: int | None = None) -> int:
        """Patches per side at ``image_size`` (None: native)."""
        return (self.image_size if image_size is None else image_size) // self.patch_size


def get_config(variant: str, *, image_size: int = DEFAULT_IMAGE_SIZE, **head: Any) -> ViTConfig:
    """``"B/16"`` -> ViTConfig; ``head`` sets pool, representation_size, num_classes."""
    match = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant)
    if match is None or match.group(1) not in VARIANTS:
        raise ValueError(
            f"unknown ViT variant {variant!r}; use <size>/<patch> with size one of "
            f"{list(VARIANTS)}, e.g. 'B/16'"
        )
    width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
    return ViTConfig(
        variant=variant,
        width=width,
        depth=depth,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        patch_size=int(match.group(2)),
        image_size=image_size,
        **head,
    )


def preprocess_images(images: jax.Array) -> jax.Array:
    """float RGB NHWC in [0, 255] -> model input in [-1, 1] (no resizing)."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got shape {images.shape}")
    return images / 127.5 - 1.0


# The model.


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        return x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y)


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = Encoder1DBlock(
                self.mlp_dim, self.num_heads, dtype=self.dtype, name=f"encoderblock_{i}"
            )(x)
        return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens."""

    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(probe, x)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        return (x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y))[:, 0]


class ViT(nn.Module):
    """``apply(variables, images)`` -> ``{'pre_logits': (B, feature_dim)}`` plus
    ``'logits': (B, num_classes)`` when the config has a head; outputs are float32.

    Images are preprocessed (``preprocess_images``), square, any size (the position
    embedding must have been resampled to it, see ``load_variables``). ``dtype`` is the
    compute dtype; parameters stay float32.
    """

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        c, dtype = self.config, self.dtype
        p = c.patch_size
        x = nn.Conv(
            c.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="embedding"
        )(jnp.asarray(images, dtype))
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        posemb = self.param(
            "pos_embedding", nn.initializers.normal(stddev=d**-0.5), (1, h * w, d), jnp.float32
        )
        x = x + posemb.astype(dtype)
        if c.pool == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, d)), x], axis=1)
        x = Encoder(c.depth, c.mlp_dim, c.num_heads, dtype=dtype, name="Transformer")(x)
        if c.pool == "tok":
            x = x[:, 0]
        elif c.pool == "gap":
            x = jnp.mean(x, axis=1)
        else:
            x = MAPHead(c.mlp_dim, c.num_heads, dtype=dtype)(x)
        if c.representation_size:
            x = jnp.tanh(nn.Dense(c.representation_size, dtype=dtype, name="pre_logits")(x))
        out = {"pre_logits": x.astype(jnp.float32)}
        if c.num_classes:
            out["logits"] = nn.Dense(c.num_classes, dtype=dtype, name="head")(x).astype(jnp.float32)
        return out


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def expected_param_shapes(
    config: ViTConfig, image_size: int | None = None
) -> dict[str, tuple[int, ...]]:
    """ "/"-joined parameter name -> shape of ``ViT(config)`` at ``image_size``."""
    size = config.image_size if image_size is None else image_size
    abstract = jax.eval_shape(
        ViT(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    )
    return _flat_shapes(abstract["params"])


def random_variables(config: ViTConfig, image_size: int | None = None, seed: int = 0) -> dict:
    """Randomly initialised variables (benchmarks and tests; no checkpoint needed)."""
    size = config.image_size if image_size is None else image_size
    return jax.jit(ViT(config).init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))


# Checkpoints.

_OLD_BLOCK_CHILD = re.compile(r"^(Transformer/encoderblock_\d+/)([A-Za-z]+)_(\d+)(/.*)$")


def _strip_prefix(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a common "params/" or "opt/target/" prefix (full training checkpoints)."""
    for prefix in ("params/", "opt/target/"):
        if flat and all(k.startswith(prefix) for k in flat):
            return {k[len(prefix) :]: v for k, v in flat.items()}
    return dict(flat)


def _renumber_block_children(flat: dict[str, Any]) -> dict[str, Any]:
    """Pre-Linen numbering inside encoder blocks (one counter across module classes:
    LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) -> per-class
    numbering (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0).

    Only children of ``Transformer/encoderblock_i`` are renumbered, so a block missing
    from the checkpoint is still reported as missing rather than renumbered away.
    """
    children: dict[str, set[tuple[int, str]]] = {}
    for key in flat:
        if m := _OLD_BLOCK_CHILD.match(key):
            children.setdefault(m.group(1), set()).add((int(m.group(3)), m.group(2)))
    renames: dict[tuple[str, str, int], int] = {}
    for block, kids in children.items():
        counts: dict[str, int] = {}
        for number, cls in sorted(kids):
            renames[block, cls, number] = counts.get(cls, 0)
            counts[cls] = counts.get(cls, 0) + 1
    out = {}
    for key, value in flat.items():
        if m := _OLD_BLOCK_CHILD.match(key):
            block, cls, number, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            key = f"{block}{cls}_{renames[block, cls, number]}{rest}"
        out[key] = value
    return out


def convert_checkpoint(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Checkpoint arrays (flat "/" names, either layout) -> big_vision names, float32.

    Returns the converted arrays and a list of problems found while converting (reported
    together with the strict shape check).
    """
    problems: list[str] = []
    flat = _renumber_block_children(_strip_prefix(flat))
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in flat:
            if "pos_embedding" in flat:
                problems.append(f"  both pos_embedding and {old} present")
            else:
                flat["pos_embedding"] = flat.pop(old)
    pe = flat.get("pos_embedding")
    if pe is not None and pe.ndim == 3:
        n = pe.shape[1]
        if int(np.sqrt(n - 1)) ** 2 == n - 1 and int(np.sqrt(n)) ** 2 != n:
            # Old layout: entry 0 belongs to the [cls] token, which then received it as
            # cls + pe[0] before the first block; fold it into cls.
            if "cls" in flat and flat["cls"].shape == pe[:, :1].shape:
                flat["cls"] = flat["cls"] + pe[:, :1]
                flat["pos_embedding"] = pe[:, 1:]
            else:
                problems.append(
                    f"  pos_embedding {pe.shape} has a [cls] entry but the checkpoint has no "
                    "matching cls parameter"
                )
    if "probe" in flat:  # MAP head parameters inlined at the top level (early ViT-g/G).
        for k in [k for k in flat if k == "probe" or re.match(r"(MlpBlock|LayerNorm|Multi)", k)]:
            flat[f"MAPHead_0/{k}"] = flat.pop(k)
    return flat, problems


def head_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """pool / representation_size / num_classes that a checkpoint (name -> shape, either
    layout) defines: "tok" if it has ``cls``, "map" if it has ``MAPHead_0`` (or an
    inlined ``probe``), else "gap"."""
    names = set(_strip_prefix(shapes))
    if "cls" in names:
        pool = "tok"
    elif "probe" in names or any(k.startswith("MAPHead_0/") for k in names):
        pool = "map"
    else:
        pool = "gap"
    flat = _strip_prefix(shapes)
    rep = flat.get("pre_logits/kernel")
    head = flat.get("head/kernel")
    return {
        "pool": pool,
        "representation_size": int(rep[-1]) if rep is not None else None,
        "num_classes": int(head[-1]) if head is not None else None,
    }


def _describe_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """ "width W, depth D, patch P, MLP M, H heads" as far as the checkpoint shows them."""
    facts = []
    if (emb := shapes.get("embedding/kernel")) is not None and len(emb) == 4:
        facts += [f"width {emb[3]}", f"patch {emb[0]}"]
    blocks = {m.group(1) for k in shapes if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    if blocks:
        facts.append(f"depth {len(blocks)}")
    if (mlp := shapes.get("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")) is not None:
        facts.append(f"MLP {mlp[-1]}")
    query = shapes.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
    if query is not None and len(query) == 3:
        facts.append(f"{query[1]} heads")
    return ", ".join(facts) or None


def resample_posemb(posemb: np.ndarray, grid_size: int) -> np.ndarray:
    """Bilinear resampling of a (1, g*g, D) position embedding to (1, grid_size**2, D).

    Grid corners map to grid corners (the convention of ``scipy.ndimage.zoom(order=1)``,
    which big_vision and vision_transformer use), so the result equals theirs.
    """
    _, n, d = posemb.shape
    old = int(round(np.sqrt(n)))
    if old * old != n:
        raise ValueError(f"position embedding of {n} entries is not a square grid")
    if old == grid_size:
        return posemb
    grid = np.asarray(posemb, np.float64).reshape(old, old, d)
    for axis in (0, 1):
        if grid_size == 1 or old == 1:
            coords = np.zeros(grid_size)
        else:
            coords = np.arange(grid_size) * (old - 1) / (grid_size - 1)
        lo = np.clip(np.floor(coords).astype(int), 0, old - 1)
        hi = np.minimum(lo + 1, old - 1)
        frac = (coords - lo).reshape([-1 if a == axis else 1 for a in range(3)])
        grid = np.take(grid, lo, axis) * (1 - frac) + np.take(grid, hi, axis) * frac
    return grid.reshape(1, grid_size * grid_size, d).astype(posemb.dtype)


def load_variables(
    path: str,
    config: ViTConfig,
    *,
    image_size: int | None = None,
    source: str | None = None,
) -> dict:
    """Flax variables of ``ViT(config)`` from the ``.npz`` checkpoint at ``path``, strictly
    checked, with the position embedding resampled from ``config.image_size`` to
    ``image_size`` (None: native). ``source`` (default ``path``) names the checkpoint in
    errors. Raises ``CheckpointMismatchError`` listing every problem at once.
    """
    source = path if source is None else source
    params, problems = convert_checkpoint(read_npz(path))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    expected = expected_param_shapes(config)
    if shapes != expected:
        c, found = config, _describe_checkpoint(shapes)
        summary = (
            f"  the config asks for ViT-{c.variant} (width {c.width}, depth {c.depth}, patch "
            f"{c.patch_size}, MLP {c.mlp_dim}, {c.num_heads} heads) at native image size "
            f"{c.image_size} ({c.grid_size() ** 2} patches)"
            + (f"; the checkpoint has {found}" if found else "")
        )
        notes = [summary, *problems]
        pe = shapes.get("pos_embedding")
        if pe is not None and len(pe) == 3 and pe != expected["pos_embedding"]:
            grid = int(round(np.sqrt(pe[1])))
            if grid * grid == pe[1] and pe[2] == c.width:
                notes.append(
                    f"  its position embeddings are a {grid}x{grid} grid, i.e. native image "
                    f"size {grid * c.patch_size}: set image_size: {grid * c.patch_size} in the "
                    "backbone's config entry"
                )
        match_parameters(shapes, expected, source=source, notes=tuple(notes))
    if problems:
        raise CheckpointMismatchError(
            "\n".join([f"checkpoint {source} could not be converted:", *problems])
        )
    if image_size is not None and config.grid_size(image_size) != config.grid_size():
        params["pos_embedding"] = resample_posemb(
            params["pos_embedding"], config.grid_size(image_size)
        )
    return {"params": traverse_util.unflatten_dict(params, sep="/")}
