"""ScatterNet: the handcrafted 2-D wavelet scattering features of Tramèr & Boneh (ICLR 2021).

"Differentially Private Learning Needs Better Features" trains linear models on the
scattering transform of the image (Oyallon & Mallat): a cascade of Morlet wavelet
convolutions and complex moduli, averaged by a low-pass filter and subsampled. For
Fashion-MNIST their code builds kymatio's ``Scattering2D(J=2, shape=(28, 28))`` (so
L = 8 angles and order 2 by kymatio's defaults) on ``ToTensor()`` images, i.e. grayscale
in [0, 1] with no mean/std normalisation, and reads (81, 7, 7) per image:

* channels = 1 + J*L + L^2 * J(J-1)/2 = 1 + 16 + 64 = 81 (order 0, 1 and 2 paths with
  j2 > j1);
* grid = 28 / 2^J = 7 per side;
* features = 81 * 7 * 7 = 3969, flattened channel-major (C, H, W) as their linear model
  does.

Their linear models then normalise these features (GroupNorm, or a privately released
per-channel mean and variance); that is a head's business, not the backbone's: the store
holds the raw scattering coefficients.

The transform is computed by kymatio's JAX backend (jit-able, same filters and algorithm
as its NumPy frontend, which the tests use as the reference). The frontend classes are
imported from ``kymatio.scattering2d`` directly: ``import kymatio.numpy`` / ``kymatio.jax``
also load the 3-D frontend, which needs ``scipy.special.sph_harm`` (removed in SciPy 1.15).

Nothing is learned, so there are no weights: the variables are empty and the "checkpoint
sha256" recorded in a store is the sha256 of :data:`DESCRIPTOR`, which names every
parameter of the transform, so stores made with other parameters never mix.

Input: the pipeline hands every backbone float RGB in [0, 255] (grayscale repeated to
three channels). :func:`preprocess_images` averages the three channels and divides by 255,
which gives back the grayscale image in [0, 1] (up to float32 rounding, <= 1 ulp).
"""

from __future__ import annotations

import functools
import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from pipeline_lib.backbones.preprocessing import Preprocessing

__all__ = [
    "CHECKPOINT_SHA256",
    "DESCRIPTOR",
    "FEATURE_DIM",
    "IMAGE_SIZE",
    "IMAGE_PREPROCESSING",
    "PREPROCESSING",
    "ScatterNet",
    "num_channels",
    "preprocess_images",
]

J = 2  # scales: the output grid is the image subsampled by 2^J
L = 8  # angles of the Morlet wavelets
MAX_ORDER = 2
IMAGE_SIZE = 28  # Fashion-MNIST / MNIST, as in Tramèr & Boneh


def num_channels(j: int = J, angles: int = L, max_order: int = MAX_ORDER) -> int:
    """Scattering paths per input channel: order 0, order 1 (j, theta), order 2 (j1 < j2)."""
    out = 1 + j * angles
    if max_order >= 2:
        out += angles * angles * j * (j - 1) // 2
    return out


def feature_dim(image_size: int = IMAGE_SIZE, j: int = J, angles: int = L) -> int:
    """Length of the flattened feature vector of a square ``image_size`` image."""
    side = image_size // 2**j
    return num_channels(j, angles) * side * side


FEATURE_DIM = feature_dim()  # 81 * 7 * 7 = 3969
DESCRIPTOR = f"scatternet J={J} L={L} order={MAX_ORDER}"
CHECKPOINT_SHA256 = hashlib.sha256(DESCRIPTOR.encode()).hexdigest()
PREPROCESSING = (
    f"ScatterNet (Tramer & Boneh 2021): mean of RGB channels / 255 -> grayscale in [0, 1], "
    f"kymatio Scattering2D J={J} L={L} order={MAX_ORDER}, {num_channels()} channels "
    f"x (S/{2**J})^2, flattened (C, H, W)"
)
# Resizing (only used when images are not already 28 x 28) as for EfficientNet-Lite; the
# values map [0, 255] to [0, 1]; preprocess_images then averages the channels.
IMAGE_PREPROCESSING = Preprocessing(
    name="scatternet",
    resize_method="bilinear",
    antialias=True,
    quantize="round",
    mean=(0.0, 0.0, 0.0),
    std=(255.0, 255.0, 255.0),
)


def preprocess_images(images: jax.Array) -> jax.Array:
    """float RGB NHWC in [0, 255] -> float32 (B, H, W) grayscale in [0, 1]."""
    return IMAGE_PREPROCESSING.normalize(images).mean(axis=-1)


@functools.lru_cache(maxsize=8)
def _scattering(height: int, width: int, j: int, angles: int, max_order: int):
    """kymatio's JAX scattering for one input shape (its filter bank is built once)."""
    from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D

    return ScatteringJax2D(J=j, shape=(height, width), L=angles, max_order=max_order)


class ScatterNet(nn.Module):
    """(B, H, W) grayscale in [0, 1] -> ``{'pre_logits': (B, C*H'*W'), 'scattering':
    (B, C, H', W')}`` with C = :func:`num_channels` and H' = H / 2^J. No parameters."""

    j: int = J
    angles: int = L
    max_order: int = MAX_ORDER

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 3:
            raise ValueError(
                f"ScatterNet expects grayscale images (B, H, W), got shape {x.shape}; "
                "use backbone.preprocess to turn RGB (B, H, W, 3) into grayscale"
            )
        scattering = _scattering(x.shape[1], x.shape[2], self.j, self.angles, self.max_order)
        coefficients = scattering(x).astype(jnp.float32)  # (B, C, H', W')
        return {
            "pre_logits": coefficients.reshape(coefficients.shape[0], -1),
            "scattering": coefficients,
        }
