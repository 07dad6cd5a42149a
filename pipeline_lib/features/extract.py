"""Batched, resumable feature extraction into a Zarr feature store.

The forward pass is jit-compiled once at a fixed batch shape. Every chunk of
the store is cut into batches of that shape; the last batch of a chunk is
padded with zeros and the padded rows are dropped. Because a chunk is always
computed from the same inputs with the same compiled program, a resumed run
writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pipeline_lib
from pipeline_lib.backbones import Backbone, get_backbone
from pipeline_lib.data import ImageDataset
from pipeline_lib.features import store as fstore

log = logging.getLogger(__name__)


def to_model_input(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 (B,H,W) or (B,H,W,C) -> float32 (B,S,S,3) in [0,255], bilinear resize.

    Grayscale is repeated to three channels. Resizing happens on the device,
    inside the jitted function, so the host only moves uint8 bytes.
    """
    x = images.astype(jnp.float32)
    if x.ndim == 3:
        x = x[..., None]
    b, _, _, c = x.shape
    x = jax.image.resize(x, (b, image_size, image_size, c), method="bilinear", antialias=True)
    if c == 1:
        x = jnp.repeat(x, 3, axis=-1)
    elif c != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    return x


def make_feature_fn(
    backbone: Backbone, variables, image_size: int
) -> Callable[[np.ndarray], jax.Array]:
    """A jitted function from a uint8 image batch to float32 pre-logit features."""

    @jax.jit
    def features(images):
        x = backbone.preprocess(to_model_input(images, image_size))
        out = backbone.module.apply(variables, x)
        return out["pre_logits"].astype(jnp.float32)

    return features


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", unit_scale=True, disable=not enabled, mininterval=2.0)


def extract_to_store(
    dataset: ImageDataset,
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
) -> dict:
    """Extract features of `dataset` into the store at `out_path`, resuming if possible.

    `chunks` restricts the work to some chunks (for sharded extraction); by
    default every pending chunk is done and the store is finalized. Returns
    throughput figures for the log.
    """
    if batch_size <= 0 or chunk_rows <= 0 or image_size <= 0:
        raise ValueError(
            f"batch_size={batch_size}, chunk_rows={chunk_rows} and image_size={image_size} "
            "must all be positive"
        )
    backbone = get_backbone(backbone_name, dtype=dtype)
    variables, checkpoint_sha256 = backbone.load_variables(image_size)
    n = len(dataset.labels)
    attrs = {
        "backbone": backbone.name,
        "checkpoint_sha256": checkpoint_sha256,
        "preprocessing": f"bilinear resize to {image_size}px, gray->RGB, {backbone.preprocessing}",
        "image_size": int(image_size),
        "compute_dtype": dtype,
        "batch_size": int(batch_size),
        "dataset": dataset.name,
        "split": dataset.split,
        "source": dataset.source,
        "num_classes": int(dataset.num_classes),
        "code_version": pipeline_lib.__version__,
    }
    fstore.create_store(
        out_path,
        num_examples=n,
        feature_dim=backbone.feature_dim,
        chunk_rows=chunk_rows,
        attrs=attrs,
    )
    todo = fstore.pending_chunks(out_path)
    if chunks is not None:
        wanted = set(chunks)
        todo = [c for c in todo if c in wanted]
    feature_fn = make_feature_fn(backbone, variables, image_size)
    images_done, t0 = 0, time.perf_counter()
    bounds = [fstore.chunk_bounds(c, n, chunk_rows) for c in todo]
    total = sum(stop - start for start, stop in bounds)
    with _progress(int(total), progress) as bar:
        for c, (start, stop) in zip(todo, bounds, strict=True):
            feats = np.empty((stop - start, backbone.feature_dim), np.float32)
            for b0 in range(start, stop, batch_size):
                b1 = min(b0 + batch_size, stop)
                batch = dataset.images[b0:b1]
                if b1 - b0 < batch_size:  # pad the last batch to the compiled shape
                    pad = np.zeros((batch_size - (b1 - b0), *batch.shape[1:]), batch.dtype)
                    batch = np.concatenate([batch, pad])
                out = np.asarray(feature_fn(batch))
                feats[b0 - start : b1 - start] = out[: b1 - b0]
                bar.update(b1 - b0)
            fstore.write_chunk(out_path, c, feats, dataset.labels[start:stop])
            images_done += stop - start
    seconds = time.perf_counter() - t0
    if finalize and not fstore.pending_chunks(out_path):
        fstore.finalize_store(out_path)
    rate = images_done / seconds if seconds > 0 else float("nan")
    log.info("extracted %d images in %.1f s (%.1f img/s)", images_done, seconds, rate)
    return {
        "images": images_done,
        "seconds": seconds,
        "images_per_second": rate,
        "chunks_done": len(todo),
    }
