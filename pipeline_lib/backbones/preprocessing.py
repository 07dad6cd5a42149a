"""How a checkpoint family turns an image into model input: resize, crop, rounding, values.

Features are only comparable with what a checkpoint's authors computed when the image
reaches the network exactly as in the family's own evaluation code. The families differ:

================  ===========================================================================
preset            what the family's evaluation code does
================  ===========================================================================
big_vision        big_vision ``resize(S)|value_range(-1, 1)``: squash to S x S with TF2
                  ``tf.image.resize`` bilinear, *no* antialiasing (half-pixel centres), then
                  ``tf.cast`` back to uint8 (truncation), then x / 127.5 - 1. SigLIP and LiT
                  image towers, big_vision ViTs, SigLIP in timm naming.
vit_jax           google-research/vision_transformer's input pipeline: the same resize, kept
                  in float (no cast back to uint8), then x / 127.5 - 1. AugReg ``.npz``.
timm_inception    timm's eval transform for AugReg ViTs (``crop_pct`` 0.9, bicubic,
                  mean = std = 0.5): resize the shorter side to floor(S / 0.9) with Pillow
                  bicubic (which antialiases), centre-crop S x S, then x / 127.5 - 1.
openai_clip       OpenAI CLIP's ``_transform``: shorter side to S with Pillow bicubic,
                  centre-crop S x S, CLIP's mean and std.
dinov2            DINOv2's ``make_classification_eval_transform``: shorter side to 256 for
                  S = 224 (crop fraction 0.875) with Pillow bicubic, centre-crop, ImageNet
                  mean and std.
efficientnet_lite this project's EfficientNet-Lite input: squash with antialiased bilinear
                  (Pillow on the host), rounded to uint8, (x - 127) / 128.
================  ===========================================================================

Two code paths apply a preset. Variable-size images are resized on the host
(:meth:`Preprocessing.resize_host`): Pillow for the antialiased presets (which is what
torchvision-based evaluation code calls, so the result is exact), and a NumPy bilinear
resize with TF2 semantics for the non-antialiased ones (exact up to float rounding).
Fixed-shape in-memory datasets are resized on the device inside the jitted forward pass
(:meth:`Preprocessing.resize_device`) with ``jax.image.resize``: exact for the
non-antialiased bilinear presets (``jax.image.resize`` without antialiasing samples at
half-pixel centres and clamps at the edges, as TF2 does), and a close float approximation
of Pillow's filters for the others (Pillow rounds to uint8 between its two passes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PRESETS",
    "Preprocessing",
    "get_preprocessing",
    "resized_shape",
    "center_crop_box",
]

RESIZE_METHODS = ("bilinear", "bicubic")
RESIZE_MODES = ("squash", "shorter_side")
QUANTIZE = ("none", "round", "truncate")

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _pixels(values: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(255.0 * v for v in values)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """One family's image preprocessing.

    Attributes:
      name: the preset's name (recorded in the store).
      resize_method: "bilinear" or "bicubic".
      antialias: whether the resize filter widens when it shrinks (Pillow, torchvision
        on PIL images) or samples the nearest pixels only (TF2 ``tf.image.resize``'s
        default, big_vision's ``resize``).
      resize_mode: "squash" resizes to S x S whatever the aspect ratio; "shorter_side"
        resizes the shorter side to floor(S / crop_fraction), keeping the aspect ratio
        (torchvision ``Resize(int)``), then centre-crops S x S (``CenterCrop``).
      crop_fraction: see resize_mode; 1.0 with "squash".
      quantize: what happens to resized pixels before normalisation: "none" (kept in
        float), "round" (to uint8, as Pillow returns) or "truncate" (to uint8 by
        ``tf.cast``, as big_vision does).
      mean, std: per channel, in pixel units [0, 255]: model input = (x - mean) / std.
    """

    name: str
    resize_method: str
    antialias: bool
    resize_mode: str = "squash"
    crop_fraction: float = 1.0
    quantize: str = "none"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)

    def __post_init__(self):
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method {self.resize_method!r}: use one of {RESIZE_METHODS}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r}: use one of {RESIZE_MODES}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize {self.quantize!r}: use one of {QUANTIZE}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction {self.crop_fraction!r} must be in (0, 1]")
        if self.resize_mode == "squash" and self.crop_fraction != 1.0:
            raise ValueError("crop_fraction applies to resize_mode 'shorter_side' only")
        if not self.antialias and self.resize_method != "bilinear":
            raise ValueError("resizing without antialiasing is implemented for bilinear only")

    def describe(self) -> str:
        """One line for logs and the store's ``preprocessing`` attribute."""
        aa = "antialiased" if self.antialias else "no antialiasing"
        if self.resize_mode == "squash":
            geometry = "squash to SxS"
        else:
            geometry = f"shorter side to floor(S/{self.crop_fraction:g}), centre crop SxS"
        mean = ", ".join(f"{m:.6g}" for m in self.mean)
        std = ", ".join(f"{s:.6g}" for s in self.std)
        return (
            f"{self.name}: {geometry}, {self.resize_method} ({aa}), "
            f"quantize {self.quantize}, (x - [{mean}]) / [{std}]"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the store's ``preprocessing_spec`` attribute)."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def normalize(self, images: jax.Array) -> jax.Array:
        """float RGB NHWC in [0, 255] -> model input (no resizing)."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got shape {images.shape}")
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return (images - mean) / std

    # Resizing.

    def _quantize(self, x, xp):
        if self.quantize == "none":
            return x
        x = xp.clip(x, 0.0, 255.0)
        return xp.floor(x) if self.quantize == "truncate" else xp.floor(x + 0.5)

    def resize_device(self, images: jax.Array, size: int) -> jax.Array:
        """float (B, H, W, C) in [0, 255] -> float32 (B, S, S, C), traceable (jit)."""
        x = jnp.asarray(images, jnp.float32)
        b, h, w, c = x.shape
        new_h, new_w = resized_shape(h, w, size, self)
        if (new_h, new_w) != (h, w):
            method = {"bilinear": "linear", "bicubic": "cubic"}[self.resize_method]
            x = jax.image.resize(x, (b, new_h, new_w, c), method=method, antialias=self.antialias)
            x = self._quantize(x, jnp)
        top, left = center_crop_box(new_h, new_w, size)
        return x[:, top : top + size, left : left + size]

    def resize_host(self, image: np.ndarray, size: int) -> np.ndarray:
        """uint8 (H, W, 3) -> (S, S, 3): uint8 when quantized, else float32."""
        h, w, _ = image.shape
        new_h, new_w = resized_shape(h, w, size, self)
        if (new_h, new_w) == (h, w):
            out = image if self.quantize != "none" else image.astype(np.float32)
        elif self.antialias:
            out = _pillow_resize(image, new_h, new_w, self.resize_method, self.quantize)
        else:
            out = self._quantize(_bilinear_half_pixel(image, new_h, new_w), np)
        top, left = center_crop_box(new_h, new_w, size)
        out = out[top : top + size, left : left + size]
        dtype = np.float32 if self.quantize == "none" else np.uint8
        return np.ascontiguousarray(out.astype(dtype))


def resized_shape(h: int, w: int, size: int, prep: Preprocessing) -> tuple[int, int]:
    """(height, width) after the resize step, before the crop (torchvision's rounding)."""
    if prep.resize_mode == "squash":
        return size, size
    short_target = math.floor(size / prep.crop_fraction + 1e-9)
    if h <= w:
        return short_target, int(short_target * w / h)
    return int(short_target * h / w), short_target


def center_crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(size)`` in an h x w image (h, w >= size)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _pillow_resize(
    image: np.ndarray, new_h: int, new_w: int, method: str, quantize: str
) -> np.ndarray:
    from PIL import Image

    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[method]
    if quantize == "none":  # Pillow's float mode, one channel at a time.
        channels = [
            np.asarray(
                Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
                    (new_w, new_h), resample=resample
                )
            )
            for c in range(image.shape[-1])
        ]
        return np.stack(channels, -1)
    return np.asarray(
        Image.fromarray(image, mode="RGB").resize((new_w, new_h), resample=resample), np.uint8
    )


def _linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF2 bilinear sampling along one axis: half-pixel centres, edge indices clamped."""
    centre = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    floor = np.floor(centre)
    lo = np.clip(floor, 0, in_size - 1).astype(int)
    hi = np.clip(floor + 1, 0, in_size - 1).astype(int)
    return lo, hi, centre - floor


def _bilinear_half_pixel(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    x = np.asarray(image, np.float32)
    lo, hi, frac = _linear_weights(x.shape[0], new_h)
    x = x[lo] * (1 - frac)[:, None, None] + x[hi] * frac[:, None, None]
    lo, hi, frac = _linear_weights(x.shape[1], new_w)
    return x[:, lo] * (1 - frac)[None, :, None] + x[:, hi] * frac[None, :, None]


PRESETS: dict[str, Preprocessing] = {
    p.name: p
    for p in [
        Preprocessing(
            name="big_vision", resize_method="bilinear", antialias=False, quantize="truncate"
        ),
        Preprocessing(name="vit_jax", resize_method="bilinear", antialias=False),
        Preprocessing(
            name="timm_inception",
            resize_method="bicubic",
            antialias=True,
            resize_mode="shorter_side",
            crop_fraction=0.9,
            quantize="round",
        ),
        Preprocessing(
            name="openai_clip",
            resize_method="bicubic",
            antialias=True,
            resize_mode="shorter_side",
            quantize="round",
            mean=_pixels(_CLIP_MEAN),
            std=_pixels(_CLIP_STD),
        ),
        Preprocessing(
            name="dinov2",
            resize_method="bicubic",
            antialias=True,
            resize_mode="shorter_side",
            crop_fraction=0.875,
            quantize="round",
            mean=_pixels(_IMAGENET_MEAN),
            std=_pixels(_IMAGENET_STD),
        ),
        Preprocessing(
            name="efficientnet_lite",
            resize_method="bilinear",
            antialias=True,
            quantize="round",
            mean=(127.0, 127.0, 127.0),
            std=(128.0, 128.0, 128.0),
        ),
    ]
}


def get_preprocessing(name: str, where: str = "preprocessing") -> Preprocessing:
    """The preset called ``name``; ``where`` names the config key in the error."""
    if name not in PRESETS:
        raise ValueError(f"{where}: unknown preprocessing {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name]
