"""Batched, sharded, resumable feature extraction into a Zarr feature store.

One store is built in three steps, each a separate call (and a separate
Snakemake job in the workflow):

1. :func:`init_store` creates the store's work directory once: layout, shapes
   and attributes (backbone and checkpoint sha256, image size, chunk rows, N,
   compute dtype, batch size). Run again, it keeps a work directory made with the
   same settings (resume) and replaces one made with other settings, none of
   whose chunks could be reused, so chunks computed under other settings are
   never mixed in. Shard jobs refuse a work directory with other settings.
2. :func:`extract_shard` fills shard ``k`` of ``S``: a contiguous range of chunks
   (:func:`~pipeline_lib.features.store.shard_chunks`). Shards write disjoint
   chunk files and their own done markers and never touch metadata, so any
   number may run at once. A rerun skips chunks that already have a marker.
3. :func:`finalize_extraction` checks that every chunk is done and the data is sane, adds
   the shards' throughput figures (``extraction_stats``) and publishes the store.

:func:`extract_to_store` does all three in one process.

Why the bytes do not depend on sharding or resumption: the forward pass is
compiled once at a fixed batch shape; every chunk is cut into batches of that
shape that never straddle chunks, and the last batch of a chunk is zero-padded
and the padded rows dropped. So each chunk is always computed from the same
inputs by the same program, whichever job computes it and whenever. (The
device count changes the per-device program, so byte-identity holds between
runs on the same number and kind of devices; across device counts features
agree to ~1e-5.)

Within a job, batches are data-parallel over the local devices
(:mod:`~pipeline_lib.features.devices`), and host work (reading, decoding,
resizing) runs ahead in background threads
(:mod:`~pipeline_lib.features.pipeline`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pipeline_lib
from pipeline_lib.backbones import TTA_MODES, Backbone, get_backbone, matmul_precision
from pipeline_lib.backbones.preprocessing import PRESETS, Preprocessing
from pipeline_lib.features import devices as dev
from pipeline_lib.features import pipeline as pipe
from pipeline_lib.features import store as fstore

log = logging.getLogger(__name__)

__all__ = [
    "ExtractionSettings",
    "extract_shard",
    "extract_to_store",
    "finalize_extraction",
    "init_store",
    "make_feature_fn",
    "to_model_input",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractionSettings:
    """How features are extracted (config key ``extraction``).

    The first three determine the stored bytes and are recorded in the store;
    changing them for a partial store is refused. The others only change speed.

    Attributes:
      batch_size: compiled global batch shape; a multiple of the devices used.
      chunk_rows: rows per Zarr chunk, the unit of resumable work.
      dtype: backbone compute dtype, "float32" or "bfloat16"; features are stored float32.
      prefetch_batches: batches prepared ahead of the device by the host threads.
      decode_threads: host threads reading and resizing batches (sources must be
        thread-safe when > 1).
      num_devices: local devices to use; None means all.
      log_every_s: seconds between throughput log lines.
    """

    batch_size: int = 64
    chunk_rows: int = 1024
    dtype: str = "float32"
    prefetch_batches: int = 2
    decode_threads: int = 1
    num_devices: int | None = None
    log_every_s: float = 30.0

    def __post_init__(self):
        for name in ("batch_size", "chunk_rows", "prefetch_batches", "decode_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"extraction.{name}={value!r} must be a positive integer")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"extraction.dtype={self.dtype!r}: use float32 or bfloat16")
        if self.num_devices is not None and (
            isinstance(self.num_devices, bool) or self.num_devices < 1
        ):
            raise ValueError(f"extraction.num_devices={self.num_devices!r}: use null or >= 1")

    @classmethod
    def from_config(cls, extraction: Mapping[str, Any]) -> ExtractionSettings:
        """From the config's ``extraction`` mapping; keys for the workflow (shards) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in extraction.items() if k in names})


def to_model_input(
    images: jax.Array, image_size: int, preprocessing: Preprocessing | None = None
) -> jax.Array:
    """uint8 (B,H,W) or (B,H,W,C) -> float32 (B,S,S,3) in [0,255], resized (and cropped,
    and rounded) as ``preprocessing`` says (default: the EfficientNet-Lite preset).

    Grayscale is repeated to three channels. Resizing happens on the device,
    inside the jitted function, so the host only moves uint8 bytes.
    """
    prep = PRESETS["efficientnet_lite"] if preprocessing is None else preprocessing
    x = images.astype(jnp.float32)
    if x.ndim == 3:
        x = x[..., None]
    c = x.shape[-1]
    x = prep.resize_device(x, image_size)
    if c == 1:
        x = jnp.repeat(x, 3, axis=-1)
    elif c != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    return x


def make_feature_fn(
    backbone: Backbone, image_size: int, *, resize_on_device: bool = True, module=None
) -> Callable[[Any, jax.Array], jax.Array]:
    """``fn(variables, images uint8) -> float32 (B, feature_dim)`` pre-logit features (not jitted).

    With ``backbone.tta == "flip"`` each row is the mean of the features of the image and
    of its horizontal flip (test-time augmentation averaging). It is still one vector per
    example, computed from that example alone, so the privacy analysis of every head
    (the sensitivity of its statistics to adding or removing one example, whose feature
    vector is clipped or normalised by the head) is unchanged; only the bytes change,
    which is why ``tta`` is part of the store's attributes and settings.

    With ``resize_on_device=False`` the images are already (B, S, S, 3) (resized on
    the host by the input pipeline) and are only converted to float.
    """
    module = backbone.module if module is None else module

    if backbone.tta not in TTA_MODES:
        raise ValueError(
            f"backbone {backbone.name!r}: tta={backbone.tta!r}; use one of {TTA_MODES}"
        )

    def features(variables, images):
        if resize_on_device:
            x = to_model_input(images, image_size, backbone.image_preprocessing)
        else:
            x = images.astype(jnp.float32)
        x = backbone.preprocess(x)
        if backbone.tta == "none":
            return module.apply(variables, x)["pre_logits"].astype(jnp.float32)
        # "flip": one forward pass over the batch and its mirror images (axis 2 is the
        # width of both NHWC and NHW inputs); row i of the result is the mean of the two
        # features of image i, so it depends on image i alone.
        b = x.shape[0]
        both = module.apply(variables, jnp.concatenate([x, jnp.flip(x, axis=2)]))
        f = both["pre_logits"].astype(jnp.float32)
        return 0.5 * (f[:b] + f[b:])

    return features


def _loop_free(module):
    """The module without sub-batch looping (``lax.map``), whose body XLA counts only once."""
    if getattr(module, "chunk_pixels", None) is not None:
        return module.clone(chunk_pixels=None)
    return module


def _preprocessing(backbone: Backbone, image_size: int, host_resize: bool) -> str:
    where = "on the host" if host_resize else "on the device"
    text = (
        f"resize {where} to {image_size}px ({backbone.image_preprocessing.describe()}), "
        f"gray->RGB, {backbone.preprocessing}"
    )
    if backbone.tta == "flip":
        text += "; features: mean over the image and its horizontal flip (tta: flip)"
    return text


def store_attrs(
    source, backbone: Backbone, checkpoint_sha256: str, image_size: int, settings
) -> dict:
    """The attributes that identify a store: what a rerun must match to resume it."""
    host_resize = pipe.resize_on_host(source)
    return {
        "backbone": backbone.name,
        "checkpoint_sha256": checkpoint_sha256,
        "preprocessing": _preprocessing(backbone, image_size, host_resize),
        "preprocessing_spec": backbone.image_preprocessing.as_dict(),
        "image_size": int(image_size),
        "compute_dtype": settings.dtype,
        "matmul_precision": matmul_precision(settings.dtype),
        "batch_size": int(settings.batch_size),
        "dataset": source.name,
        "split": source.split,
        "source": source.source,
        "num_classes": int(source.num_classes),
        # label i is class_names[i]; released heads carry them (null when the source has none)
        "class_names": _class_names(source),
        "code_version": pipeline_lib.__version__,
        # only when used, so that stores made without TTA keep their attributes
        **({"tta": backbone.tta} if backbone.tta != "none" else {}),
    }


def _class_names(source) -> list[str] | None:
    names = getattr(source, "class_names", None)
    if not names or len(names) != int(source.num_classes):
        return None
    return [str(n) for n in names]


def _load(backbone_name: str, settings, image_size: int, backbone_options: Mapping | None):
    backbone = get_backbone(backbone_name, dtype=settings.dtype, **dict(backbone_options or {}))
    variables, sha256 = backbone.load_variables(image_size)
    return backbone, variables, sha256


def _shape_args(source, backbone: Backbone, settings) -> dict:
    return {
        "num_examples": int(source.num_examples),
        "feature_dim": int(backbone.feature_dim),
        "chunk_rows": int(settings.chunk_rows),
    }


def init_store(
    source,
    *,
    backbone_name: str,
    out_path: str | Path,
    image_size: int,
    settings: ExtractionSettings,
    backbone_options: Mapping | None = None,
    recipe: Mapping | None = None,
) -> dict:
    """Create the work directory of the store at ``out_path`` once (or check it); return its attrs.

    A work directory made with other settings (another checkpoint, image size,
    chunk_rows, N, dtype, batch size...) is replaced: none of its chunks could be
    reused. ``recipe`` (how to reopen the source, see
    :func:`pipeline_lib.features.verify.make_recipe`) is kept in the store's
    manifest so that damaged chunks can be re-extracted later.
    """
    _check_image_size(image_size)
    backbone, _, sha256 = _load(backbone_name, settings, image_size, backbone_options)
    attrs = store_attrs(source, backbone, sha256, image_size, settings)
    shape = _shape_args(source, backbone, settings)
    fstore.create_store(
        out_path, attrs=attrs, recipe=None if recipe is None else dict(recipe), **shape
    )
    return fstore.partial_attrs(out_path)


def extract_shard(
    source,
    *,
    backbone_name: str,
    out_path: str | Path,
    image_size: int,
    settings: ExtractionSettings,
    shard: int = 0,
    num_shards: int = 1,
    backbone_options: Mapping | None = None,
    chunks: Iterable[int] | None = None,
    progress: bool = False,
) -> dict:
    """Fill the pending chunks of shard ``shard`` of ``num_shards`` (or of ``chunks``).

    The store's work directory must exist (:func:`init_store`) and match these
    settings. Returns this job's figures (images/s, FLOP/s, devices...), which
    are also logged.
    """
    _check_image_size(image_size)
    wall0 = time.perf_counter()
    backbone, variables, sha256 = _load(backbone_name, settings, image_size, backbone_options)
    attrs = store_attrs(source, backbone, sha256, image_size, settings)
    shape = _shape_args(source, backbone, settings)
    fstore.check_store(out_path, attrs=attrs, **shape)
    n, rows = shape["num_examples"], shape["chunk_rows"]
    mine = fstore.shard_chunks(fstore.num_chunks(n, rows), num_shards, shard)
    if chunks is not None:
        wanted = set(chunks)
        mine = [c for c in mine if c in wanted]
    pending = set(fstore.pending_chunks(out_path, mine, verify=True))
    todo = [c for c in mine if c in pending]
    log.info(
        "shard %d/%d of %s: chunks [%s], %d already done, %d to do",
        shard,
        num_shards,
        out_path,
        f"{mine[0]}..{mine[-1]}" if len(mine) else "",
        len(mine) - len(todo),
        len(todo),
    )
    # ViTs carry their precision in the module; this covers every other backbone.
    with jax.default_matmul_precision(matmul_precision(settings.dtype)):
        stats = _run_chunks(
            source, backbone, variables, out_path, todo, image_size, settings, progress=progress
        )
    stats.update(
        shard=shard,
        num_shards=num_shards,
        chunk_range=[mine[0], mine[-1] + 1] if len(mine) else [],
        chunks_done=len(todo),
        chunks_already_done=len(mine) - len(todo),
        wall_seconds=time.perf_counter() - wall0,
        compute_dtype=settings.dtype,
        batch_size=settings.batch_size,
        prefetch_batches=settings.prefetch_batches,
        decode_threads=settings.decode_threads,
        host_resize=pipe.resize_on_host(source),
    )
    return stats


def _check_image_size(image_size: int) -> None:
    if image_size <= 0:
        raise ValueError(f"image_size={image_size} must be positive")


def _run_chunks(
    source,
    backbone: Backbone,
    variables,
    out_path,
    todo: list[int],
    image_size: int,
    settings: ExtractionSettings,
    *,
    progress: bool,
) -> dict:
    """The device loop: prefetched host batches -> data-parallel forward -> chunk writes."""
    mesh = dev.data_parallel_mesh(settings.num_devices)
    num_devices = mesh.devices.size
    dev.check_batch_size(settings.batch_size, num_devices)
    host_resize = pipe.resize_on_host(source)
    in_sharding, repl = dev.batch_sharding(mesh), dev.replicated(mesh)
    fn = make_feature_fn(backbone, image_size, resize_on_device=not host_resize)
    jitted = jax.jit(fn, in_shardings=(repl, in_sharding), out_shardings=in_sharding)
    variables = jax.device_put(variables, repl)
    device = mesh.devices.flat[0]
    figures = {
        "num_devices": int(num_devices),
        "platform": device.platform,
        "device_kind": device.device_kind,
    }
    n, rows = int(source.num_examples), settings.chunk_rows
    bounds = [(c, *fstore.chunk_bounds(c, n, rows)) for c in todo]
    if not bounds:
        return dict(figures, **_empty_summary())

    load = lambda r: pipe.make_batch(  # noqa: E731
        source,
        *r,
        batch_size=settings.batch_size,
        image_size=image_size,
        host_resize=host_resize,
        preprocessing=backbone.image_preprocessing,
    )
    writer = _ChunkWriter(out_path, source, bounds, backbone.feature_dim)
    compiled, meter = None, None
    total = sum(stop - start for _, start, stop in bounds)
    with (
        pipe.Prefetcher(
            load,
            pipe.batch_ranges(bounds, settings.batch_size),
            depth=settings.prefetch_batches,
            workers=settings.decode_threads,
        ) as batches,
        _progress(total, progress) as bar,
    ):
        in_flight = None
        for batch in batches:
            x = jax.device_put(batch.images, in_sharding)
            if compiled is None:
                compiled, more = _compile(
                    jitted, backbone, variables, x, image_size, host_resize, mesh
                )
                figures.update(more)
                meter = dev.Throughput(
                    flops_per_batch=figures["flops_per_batch"],
                    batch_size=settings.batch_size,
                    log_every_s=settings.log_every_s,
                )
            out = compiled(variables, x)  # dispatched asynchronously
            if in_flight is not None:  # collect the previous batch while this one runs
                writer.add(*in_flight)
                meter.update(in_flight[0].num_valid)
                bar.update(in_flight[0].num_valid)
            in_flight = (batch, out)
        if in_flight is not None:
            writer.add(*in_flight)
            meter.update(in_flight[0].num_valid)
            bar.update(in_flight[0].num_valid)
    writer.check_done()
    summary = dict(figures, **meter.summary())
    log.info(
        "extracted %d images in %.1f s on %d %s device(s): %.1f img/s, %s (compile %.1f s)",
        summary["images"],
        summary["seconds"],
        num_devices,
        summary["platform"],
        summary["images_per_second"],
        dev._fmt_flops(summary["flop_per_second"]),
        summary["compile_seconds"],
    )
    return summary


# Compiled forward passes of this process, keyed on everything that defines the program
# (see _program_key), so that a process extracting several stores or shards with the same
# backbone and batch shape traces and compiles once (tests and warm workflow processes do;
# a sharded extraction's jobs on one machine too). Least recently used first.
_COMPILED: OrderedDict[tuple, tuple[Any, float | None]] = OrderedDict()
_COMPILED_MAX = 8


def _program_key(backbone: Backbone, variables, x, image_size: int, host_resize: bool, mesh):
    """What the compiled program depends on: the module's full configuration (its repr lists
    every field), the preprocessing (described exactly by its string and preset), the TTA
    mode, input size and resize placement, the batch's shape and dtype, the variables'
    shapes and dtypes (their values are arguments), the shardings (devices) and the
    default matmul precision. Nothing here is a memory address, so a key can never match
    a different program that happens to reuse a freed object's id."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    return (
        type(backbone.module).__module__,
        type(backbone.module).__qualname__,
        repr(backbone.module),
        backbone.name,
        backbone.preprocessing,
        repr(backbone.image_preprocessing),
        backbone.tta,
        int(image_size),
        bool(host_resize),
        tuple(x.shape),
        str(x.dtype),
        str(tree),
        tuple((tuple(v.shape), str(v.dtype)) for v in leaves),
        tuple(mesh.axis_names),
        tuple((d.platform, d.id) for d in mesh.devices.flat),
        str(jax.config.jax_default_matmul_precision),
    )


def _compile(jitted, backbone: Backbone, variables, x, image_size: int, host_resize: bool, mesh):
    """AOT-compile for this batch (or reuse this process's compilation of the same program);
    FLOPs of the global batch from a loop-free lowering."""
    t0 = time.perf_counter()
    key = _program_key(backbone, variables, x, image_size, host_resize, mesh)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        compiled, flops = _COMPILED[key]
        return compiled, {"compile_seconds": time.perf_counter() - t0, "flops_per_batch": flops}
    compiled = jitted.lower(variables, x).compile()
    compile_seconds = time.perf_counter() - t0
    loop_free = make_feature_fn(
        backbone, image_size, resize_on_device=not host_resize, module=_loop_free(backbone.module)
    )
    flops = dev.lowered_flops(jax.jit(loop_free).lower(variables, x))
    _COMPILED[key] = (compiled, flops)
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return compiled, {"compile_seconds": compile_seconds, "flops_per_batch": flops}


def _empty_summary() -> dict:
    return {
        "images": 0,
        "batches": 0,
        "seconds": 0.0,
        "images_per_second": 0.0,
        "flops_per_image": None,
        "flop_per_second": None,
        "compile_seconds": 0.0,
        "flops_per_batch": None,
    }


class _ChunkWriter:
    """Gathers batch outputs into whole chunks and writes each when it is complete."""

    def __init__(self, out_path, source, bounds, feature_dim: int):
        self.out_path, self.source = out_path, source
        self.bounds = {c: (start, stop) for c, start, stop in bounds}
        self.feature_dim = feature_dim
        self.current: int | None = None
        self.written: set[int] = set()

    def add(self, batch: pipe.Batch, out: jax.Array) -> None:
        if batch.chunk != self.current:
            if self.current is not None:
                raise RuntimeError(
                    f"chunk {self.current} incomplete when chunk {batch.chunk} began"
                )
            start, stop = self.bounds[batch.chunk]
            self.current, self.start, self.filled = batch.chunk, start, 0
            self.feats = np.empty((stop - start, self.feature_dim), np.float32)
            self.labels = np.empty((stop - start,), np.int32)
        a, b = batch.start - self.start, batch.stop - self.start
        self.feats[a:b] = np.asarray(out)[: batch.num_valid]
        self.labels[a:b] = batch.labels
        self.filled += batch.num_valid
        if self.filled == len(self.labels):
            fstore.write_chunk(self.out_path, self.current, self.feats, self.labels)
            self.written.add(self.current)
            self.current = None

    def check_done(self) -> None:
        missing = sorted(set(self.bounds) - self.written)
        if missing:
            raise RuntimeError(f"internal error: chunks {missing} were not written")


def finalize_extraction(out_path: str | Path, shard_stats: Iterable[Mapping] = ()) -> dict:
    """Check every chunk is done and the data is sane, then publish the store atomically.

    The shards' figures go into the store's ``extraction_stats`` attribute
    (per shard, and totals). Returns that attribute.
    """
    shards = sorted((dict(s) for s in shard_stats), key=lambda s: s.get("shard", 0))
    images = sum(int(s.get("images", 0)) for s in shards)
    busy = sum(float(s.get("seconds", 0.0)) for s in shards)
    flops = [
        s["flop_per_second"] * s["seconds"] for s in shards if s.get("flop_per_second") is not None
    ]
    stats = {
        "num_shards": len(shards),
        "images_extracted": images,
        "device_seconds": busy,  # summed over jobs, excluding compilation
        "images_per_second_per_job": images / busy if busy > 0 else None,
        "flop_per_second_per_job": sum(flops) / busy if flops and busy > 0 else None,
        "shards": shards,
    }
    fstore.finalize_store(out_path, extra_attrs={"extraction_stats": stats})
    return stats


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", unit_scale=True, disable=not enabled, mininterval=2.0)


def extract_to_store(
    dataset,
    *,
    backbone_name: str,
    out_path: str | Path,
    image_size: int,
    batch_size: int = 64,
    chunk_rows: int = 1024,
    dtype: str = "float32",
    chunks: Iterable[int] | None = None,
    finalize: bool = True,
    progress: bool = True,
    num_devices: int | None = None,
    prefetch_batches: int = 2,
    decode_threads: int = 1,
    backbone_options: Mapping | None = None,
    recipe: Mapping | None = None,
) -> dict:
    """Extract features of ``dataset`` (an ImageSource) into ``out_path`` in one process.

    Init, one shard covering every chunk (or only ``chunks``), and, when
    ``finalize`` and nothing is left, the finalize step. Resumes a partial store.
    Returns this run's figures (``chunks_done``, ``images_per_second``, ...).
    """
    settings = ExtractionSettings(
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        dtype=dtype,
        num_devices=num_devices,
        prefetch_batches=prefetch_batches,
        decode_threads=decode_threads,
    )
    common = dict(
        backbone_name=backbone_name,
        out_path=out_path,
        image_size=image_size,
        settings=settings,
        backbone_options=backbone_options,
    )
    init_store(dataset, recipe=recipe, **common)
    stats = extract_shard(dataset, chunks=chunks, progress=progress, **common)
    if finalize and not fstore.pending_chunks(out_path):
        finalize_extraction(out_path, [stats])
    return stats
