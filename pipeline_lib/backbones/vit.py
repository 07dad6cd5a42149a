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
# How the image feature is pooled from the encoded tokens, as big_vision's pool_type:
# "tok" the [cls] token, "gap" the mean of the patch tokens, "map" a MAP head, "0" the first
# token of a model without [cls], "none" no pooling (the feature is every token).
POOL_TYPES = ("tok", "gap", "map", "0", "none")
ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu")

# name -> (width, depth, mlp_dim, num_heads); big_vision's decode_variant (from Table 2 of
# arXiv 2106.04560, plus its mu, So400m, g-opt, G-opt and e), plus "tiny" for tests.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 128, 2),
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
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
    # Details that differ between checkpoint families (defaults: big_vision).
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    layer_scale: bool = False
    num_registers: int = 0
    pre_norm: bool = False

    def __post_init__(self):
        if self.pool not in POOL_TYPES:
            raise ValueError(f"unknown ViT pool_type {self.pool!r}; choose one of {POOL_TYPES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; use one of {ACTIVATIONS}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} < patch size {self.patch_size}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the patch size "
                f"{self.patch_size}; use e.g. {self.grid_size() * self.patch_size}"
            )

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
            "0": "first token after encoder_norm (no [cls])",
            "none": "every token after encoder_norm (unpooled)",
        }[self.pool]
        if self.representation_size:
            pooled = f"tanh(pre_logits({pooled}))"
        return f"ViT-{self.variant} {pooled}, {self.feature_dim}-d"

    def grid_size(self, image_size: int | None = None) -> int:
        """Patches per side at ``image_size`` (None: native)."""
        return (self.image_size if image_size is None else image_size) // self.patch_size


def get_config(variant: str, *, image_size: int = DEFAULT_IMAGE_SIZE, **head: Any) -> ViTConfig:
    """``"B/16"`` -> ViTConfig; ``head`` sets pool, representation_size, num_classes."""
    match = re.fullmatch(r"([A-Za-z0-9-]+)/(\d+)", variant)
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


def _activation(name: str, x):
    if name == "gelu_tanh":  # flax's default, big_vision, timm's SigLIP
        return nn.gelu(x, approximate=True)
    if name == "gelu":  # exact (erf), torch.nn.GELU: timm AugReg, DINOv2, OpenCLIP
        return nn.gelu(x, approximate=False)
    return x * jax.nn.sigmoid(1.702 * x)  # QuickGELU: OpenAI CLIP


class MlpBlock(nn.Module):
    mlp_dim: int
    activation: str = "gelu_tanh"
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        dense = dict(dtype=self.dtype, precision=self.precision)
        y = _activation(self.activation, nn.Dense(self.mlp_dim, **dense)(x))
        return nn.Dense(x.shape[-1], **dense)(y)


class Encoder1DBlock(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype)
        norm = dict(epsilon=c.layer_norm_eps, **kw)
        y = nn.LayerNorm(**norm)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, precision=self.precision, **kw)(
            y, y
        )
        if c.layer_scale:
            y = y * self.param("layer_scale_0", nn.initializers.ones, (x.shape[-1],))
        x = x + y
        y = nn.LayerNorm(**norm)(x)
        y = MlpBlock(c.mlp_dim, c.activation, precision=self.precision, **kw)(y)
        if c.layer_scale:
            y = y * self.param("layer_scale_1", nn.initializers.ones, (x.shape[-1],))
        return x + y


class Encoder(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.depth):
            x = Encoder1DBlock(
                self.config, dtype=self.dtype, precision=self.precision, name=f"encoderblock_{i}"
            )(x)
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps, dtype=self.dtype, name="encoder_norm"
        )(x)


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens."""

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads, dtype=self.dtype, precision=self.precision
        )(probe, x)
        y = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype)(x)
        mlp = MlpBlock(c.mlp_dim, c.activation, dtype=self.dtype, precision=self.precision)
        return (x + mlp(y))[:, 0]


class ViT(nn.Module):
    """``apply(variables, images)`` -> ``{'pre_logits': (B, feature_dim)}`` plus
    ``'logits': (B, num_classes)`` when the config has a head; outputs are float32.
    With pool_type "none", ``pre_logits`` is every token, (B, tokens, feature_dim).

    Images are preprocessed (see ``pipeline_lib.backbones.preprocessing``), square, any
    size (the position embedding must have been resampled to it, see ``load_variables``).
    ``dtype`` is the compute dtype; parameters stay float32. ``precision`` is the matmul
    precision of every dense layer, convolution and attention product (None: JAX's
    default, which may use TF32 or bf16 passes on GPUs and TPUs).

    Tokens are [cls] (pool_type "tok"), then the register tokens (DINOv2), then the patch
    tokens; the position embedding covers the patch tokens only.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images):
        c, dtype, prec = self.config, self.dtype, self.precision
        p = c.patch_size
        x = nn.Conv(
            c.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            precision=prec,
            name="embedding",
        )(jnp.asarray(images, dtype))
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        posemb = self.param(
            "pos_embedding", nn.initializers.normal(stddev=d**-0.5), (1, h * w, d), jnp.float32
        )
        x = x + posemb.astype(dtype)
        prefix = []
        if c.pool == "tok":
            prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32))
        if c.num_registers:
            prefix.append(
                self.param("reg", nn.initializers.zeros, (1, c.num_registers, d), jnp.float32)
            )
        if prefix:
            tokens = jnp.concatenate(prefix, axis=1).astype(dtype)
            x = jnp.concatenate([jnp.broadcast_to(tokens, (n, *tokens.shape[1:])), x], axis=1)
        if c.pre_norm:
            x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype, name="pre_norm")(x)
        x = Encoder(c, dtype=dtype, precision=prec, name="Transformer")(x)
        num_prefix = sum(t.shape[1] for t in prefix)
        if c.pool in ("tok", "0"):
            x = x[:, 0]
        elif c.pool == "gap":
            x = jnp.mean(x[:, num_prefix:], axis=1)
        elif c.pool == "map":
            x = MAPHead(c, dtype=dtype, precision=prec)(x)
        if c.representation_size:
            dense = nn.Dense(c.representation_size, dtype=dtype, precision=prec, name="pre_logits")
            x = jnp.tanh(dense(x))
        out = {"pre_logits": x.astype(jnp.float32)}
        if c.num_classes:
            head = nn.Dense(c.num_classes, dtype=dtype, precision=prec, name="head")
            out["logits"] = head(x).astype(jnp.float32)
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
# Prefixes of full training checkpoints and two-tower (SigLIP / LiT) files, longest first:
# of a two-tower file only the image tower is kept.
_PREFIXES = ("params/img/", "opt/target/img/", "img/", "params/", "opt/target/")


@dataclasses.dataclass
class Converted:
    """A checkpoint in this module's (big_vision) parameter names.

    ``origin`` maps each converted name to the (name, shape) it had in the file, for
    errors; ``problems`` are conversion problems reported with the strict check;
    ``prefix`` is the prefix that was stripped ("params/img/" for a two-tower file).
    """

    params: dict[str, np.ndarray]
    origin: dict[str, tuple[str, tuple[int, ...]]]
    problems: list[str]
    prefix: str = ""


def _strip_prefix(flat: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Drop a "params/", "opt/target/" prefix (full training checkpoints), or keep only
    the image tower "params/img/" of a two-tower file (its txt/, t and b are dropped)."""
    for prefix in _PREFIXES:
        if prefix.endswith("img/"):
            if any(k.startswith(prefix) for k in flat):
                return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}, (
                    prefix
                )
        elif flat and all(k.startswith(prefix) for k in flat):
            return {k[len(prefix) :]: v for k, v in flat.items()}, prefix
    return dict(flat), ""


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


def _rename(converted: Converted, old: str, new: str) -> None:
    converted.params[new] = converted.params.pop(old)
    converted.origin[new] = converted.origin.pop(old)


def fold_cls_posemb(converted: Converted, cls: str = "cls") -> None:
    """A position embedding with an entry for the [cls] token (the old vit_jax layout, and
    timm's) -> the patch entries only, the [cls] entry added to ``cls``: exact, since the
    [cls] token only ever enters the network with its position embedding added."""
    pe = converted.params.get("pos_embedding")
    if pe is None or pe.ndim != 3:
        return
    n = pe.shape[1]
    if int(np.sqrt(n - 1)) ** 2 == n - 1 and int(np.sqrt(n)) ** 2 != n:
        if cls in converted.params and converted.params[cls].shape == pe[:, :1].shape:
            converted.params[cls] = converted.params[cls] + pe[:, :1]
            converted.params["pos_embedding"] = pe[:, 1:]
        else:
            name = converted.origin["pos_embedding"][0]
            converted.problems.append(
                f"  {name} {pe.shape} has a [cls] entry but the checkpoint has no matching "
                "[cls] token"
            )


def convert_checkpoint(flat: Mapping[str, np.ndarray]) -> Converted:
    """big_vision / vit_jax checkpoint arrays (flat "/" names, any of their layouts) ->
    big_vision names, float32, with each name's origin in the file."""
    stripped, prefix = _strip_prefix(flat)
    renamed = _renumber_block_children(stripped)
    origin = {
        new: (prefix + old, tuple(np.shape(stripped[old])))
        for new, old in zip(renamed, stripped, strict=True)
    }
    params = {k: np.asarray(v, np.float32) for k, v in renamed.items()}
    converted = Converted(params, origin, [], prefix)
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in params:
            if "pos_embedding" in params:
                converted.problems.append(f"  both pos_embedding and {prefix}{old} present")
            else:
                _rename(converted, old, "pos_embedding")
    fold_cls_posemb(converted)
    if "probe" in params:  # MAP head parameters inlined at the top level (early ViT-g/G).
        for k in [k for k in params if k == "probe" or re.match(r"(MlpBlock|LayerNorm|Multi)", k)]:
            _rename(converted, k, f"MAPHead_0/{k}")
    return converted


def pool_candidates(names) -> tuple[str, ...]:
    """The pool types a checkpoint (converted names) can have been trained with: "tok" if
    it has ``cls``, "map" if it has a MAP head, else any of "gap", "0" and "none" (their
    parameters are identical, so the file cannot tell them apart)."""
    names = set(names)
    if "cls" in names:
        return ("tok",)
    if any(k.startswith("MAPHead_0/") for k in names):
        return ("map",)
    return ("gap", "0", "none")


def resolve_pool(declared: str | None, names, *, where: str, source: str) -> str:
    """The pool type: ``declared`` (config key ``where``) checked against the file, or the
    one the file implies. Raises ValueError on disagreement or ambiguity."""
    candidates = pool_candidates(names)
    if declared is not None:
        if declared not in POOL_TYPES:
            raise ValueError(f"{where} is {declared!r}; choose one of {POOL_TYPES}")
        if declared not in candidates:
            raise ValueError(
                f"{where} is {declared!r} but checkpoint {source} {_POOL_EVIDENCE[candidates]}, "
                f"so its pooling is {' or '.join(map(repr, candidates))}"
            )
        return declared
    if len(candidates) > 1:
        raise ValueError(
            f"checkpoint {source} {_POOL_EVIDENCE[candidates]}, so it may pool by "
            f"{', '.join(map(repr, candidates))} (the parameters are the same) and the "
            f"features differ: set {where} to the pool_type it was trained with"
        )
    return candidates[0]


_POOL_EVIDENCE = {
    ("tok",): "has a [cls] token",
    ("map",): "has a MAP head",
    ("gap", "0", "none"): "has neither a [cls] token nor a MAP head",
}


def convert_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A big_vision checkpoint's name -> shape map in converted names, without reading or
    converting arrays (position embeddings keep their file shape)."""
    stripped, _ = _strip_prefix(shapes)
    out = _renumber_block_children(stripped)
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in out and "pos_embedding" not in out:
            out["pos_embedding"] = out.pop(old)
    if "probe" in out:
        for k in [k for k in out if k == "probe" or re.match(r"(MlpBlock|LayerNorm|Multi)", k)]:
            out[f"MAPHead_0/{k}"] = out.pop(k)
    return out


def head_config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    pool: str | None = None,
    *,
    where: str = "pool_type",
    source: str = "checkpoint",
) -> dict[str, Any]:
    """pool / representation_size / num_classes that a big_vision checkpoint (name ->
    shape, any layout) defines. ``pool`` is the declared pool type (None: the file must
    imply one, see ``resolve_pool``)."""
    return head_config(convert_shapes(shapes), pool, where=where, source=source)


def head_config(
    shapes: Mapping[str, tuple[int, ...]], pool: str | None, *, where: str, source: str
) -> dict[str, Any]:
    """Like ``head_config_from_shapes``, of converted names."""
    rep = shapes.get("pre_logits/kernel")
    head = shapes.get("head/kernel")
    return {
        "pool": resolve_pool(pool, shapes, where=where, source=source),
        "representation_size": int(rep[-1]) if rep is not None else None,
        "num_classes": int(head[-1]) if head is not None else None,
    }


def _looks_like(width: int, depth: int | None, mlp: int | None, heads: int | None) -> list[str]:
    return [
        name
        for name, (w, d, m, h) in VARIANTS.items()
        if w == width
        and (depth is None or d == depth)
        and (mlp is None or m == mlp)
        and (heads is None or h == heads)
    ]


def describe_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """ "width W, depth D, patch P, MLP M, H heads; it looks like ViT-X/P with pooling Y"
    as far as the checkpoint (converted names) shows them."""
    facts = []
    width = depth = mlp = heads = patch = None
    if (emb := shapes.get("embedding/kernel")) is not None and len(emb) == 4:
        width, patch = emb[3], emb[0]
        facts += [f"width {width}", f"patch {patch}"]
    blocks = {m.group(1) for k in shapes if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    if blocks:
        depth = len(blocks)
        facts.append(f"depth {depth}")
    if (m := shapes.get("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")) is not None:
        mlp = m[-1]
        facts.append(f"MLP {mlp}")
    query = shapes.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
    if query is not None and len(query) == 3:
        heads = query[1]
        facts.append(f"{heads} heads")
    if not facts:
        return None
    text = ", ".join(facts)
    if width is not None:
        names = _looks_like(width, depth, mlp, heads)
        if names:
            text += "; it looks like " + " or ".join(f"ViT-{n}/{patch}" for n in names)
        pools = pool_candidates(shapes)
        text += f" with pool_type {' or '.join(map(repr, pools))}"
    return text


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


def read_checkpoint(path: str, num_heads: int) -> Converted:
    """The checkpoint at ``path`` in big_vision names: a ``.safetensors`` file in timm
    naming (``vit_timm``; fused qkv weights are split into ``num_heads`` heads), else a
    big_vision / vit_jax ``.npz``."""
    if str(path).endswith(".safetensors"):
        from pipeline_lib.backbones import vit_timm

        return vit_timm.convert_state_dict(vit_timm.read_safetensors(path), num_heads)
    return convert_checkpoint(read_npz(path))


def _mismatch_notes(config: ViTConfig, shapes, expected) -> list[str]:
    c, found = config, describe_checkpoint(shapes)
    notes = [
        f"  the config asks for ViT-{c.variant} (width {c.width}, depth {c.depth}, patch "
        f"{c.patch_size}, MLP {c.mlp_dim}, {c.num_heads} heads) with pool_type {c.pool!r} at "
        f"native image size {c.image_size} ({c.grid_size() ** 2} patches)"
        + (f"; the checkpoint has {found}" if found else "")
    ]
    emb = shapes.get("embedding/kernel")
    if emb is not None and len(emb) == 4 and emb[0] != c.patch_size:
        size = c.variant.split("/")[0]
        notes.append(
            f"  its patches are {emb[0]}x{emb[1]} pixels: use variant '{size}/{emb[0]}' "
            f"(the number after the slash is the patch size)"
        )
    pe = shapes.get("pos_embedding")
    if pe is not None and len(pe) == 3 and pe != expected.get("pos_embedding"):
        grid = int(round(np.sqrt(pe[1])))
        p = emb[0] if emb is not None and len(emb) == 4 else c.patch_size
        if grid * grid == pe[1] and pe[2] == c.width:
            notes.append(
                f"  its position embeddings are a {grid}x{grid} grid, i.e. native image "
                f"size {grid * p}: set image_size: {grid * p} in the backbone's config entry"
            )
    return notes


def load_variables(
    path: str,
    config: ViTConfig,
    *,
    image_size: int | None = None,
    source: str | None = None,
) -> dict:
    """Flax variables of ``ViT(config)`` from the checkpoint at ``path`` (``.npz`` in
    big_vision / vit_jax layout, or ``.safetensors`` in timm naming), strictly checked,
    with the position embedding resampled from ``config.image_size`` to ``image_size``
    (None: native). ``source`` (default ``path``) names the checkpoint in errors. Raises
    ``CheckpointMismatchError`` listing every problem at once, each parameter by its name
    in the file.
    """
    source = path if source is None else source
    converted = read_checkpoint(path, config.num_heads)
    params, problems = converted.params, converted.problems
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    expected = expected_param_shapes(config)
    if shapes != expected:
        notes = (*_mismatch_notes(config, shapes, expected), *problems)
        match_parameters(shapes, expected, source=source, notes=notes, origin=converted.origin)
    if problems:
        raise CheckpointMismatchError(
            "\n".join([f"checkpoint {source} could not be converted:", *problems])
        )
    if image_size is not None and config.grid_size(image_size) != config.grid_size():
        params["pos_embedding"] = resample_posemb(
            params["pos_embedding"], config.grid_size(image_size)
        )
    return {"params": traverse_util.unflatten_dict(params, sep="/")}
