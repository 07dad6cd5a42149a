"""Linear heads: prediction and streamed evaluation."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.features.store import FeatureStore
from pipeline_lib.privacy.clipping import bound_rows


@partial(jax.jit, static_argnames=("l2_clip_norm", "transform"))
def predict_logits(weights, bias, features, *, l2_clip_norm, transform):
    """Scores of the linear head on features bounded exactly as in training."""
    return bound_rows(features, l2_clip_norm, transform) @ weights + bias


def accuracy(
    store: FeatureStore,
    weights: np.ndarray,
    bias: np.ndarray | None,
    *,
    l2_clip_norm: float,
    transform: str,
) -> float:
    """Top-1 accuracy over the whole store, streamed chunk by chunk."""
    kw = dict(l2_clip_norm=l2_clip_norm, transform=transform)
    return num_correct(store, weights, bias, **kw) / store.num_examples


def confusion_matrix(
    store: FeatureStore,
    weights: np.ndarray,
    bias: np.ndarray | None,
    *,
    l2_clip_norm: float,
    transform: str,
) -> np.ndarray:
    """(K, K) int64 counts: row = true label, column = predicted label, streamed."""
    weights = jnp.asarray(weights, jnp.float32)
    k = weights.shape[1]
    bias = jnp.zeros(k, jnp.float32) if bias is None else jnp.asarray(bias)
    counts = np.zeros((k, k), np.int64)
    for feats, labels in store.iter_chunks():
        logits = predict_logits(
            weights, bias, feats, l2_clip_norm=float(l2_clip_norm), transform=transform
        )
        pred = np.asarray(jnp.argmax(logits, axis=-1))
        np.add.at(counts, (np.asarray(labels, np.int64), pred), 1)
    return counts


def num_correct(
    store: FeatureStore,
    weights: np.ndarray,
    bias: np.ndarray | None,
    *,
    l2_clip_norm: float,
    transform: str,
) -> int:
    """Number of rows of the store whose top-1 prediction is right."""
    weights = jnp.asarray(weights, jnp.float32)
    bias = jnp.zeros(weights.shape[1], jnp.float32) if bias is None else jnp.asarray(bias)
    correct = 0
    for feats, labels in store.iter_chunks():
        logits = predict_logits(
            weights, bias, feats, l2_clip_norm=float(l2_clip_norm), transform=transform
        )
        correct += int(np.sum(np.asarray(jnp.argmax(logits, axis=-1)) == labels))
    return correct
