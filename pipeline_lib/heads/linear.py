"""Linear heads: prediction, streamed evaluation, and the shared linear algebra.

Shared by the heads: `solve_ridge_psd` (ridge solve from a possibly noisy Gram
matrix) and `pad_rows` / `padded_chunks` (fixed shapes for jit, with a mask).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.features.store import FeatureStore
from pipeline_lib.privacy.clipping import bound_rows, check_bound


def predict_logits(weights, bias, features, *, l2_clip_norm, transform):
    """Scores of the linear head on features bounded exactly as in training."""
    c = check_bound("l2_clip_norm", l2_clip_norm)
    return _predict_logits(weights, bias, features, l2_clip_norm=c, transform=transform)


@partial(jax.jit, static_argnames=("transform",))  # C is traced: one program for every C
def _predict_logits(weights, bias, features, *, l2_clip_norm, transform):
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


def pad_rows(x: np.ndarray, y: np.ndarray, rows: int):
    """Pad (x, y) with zero rows up to `rows` and return (x, y, mask): one compiled shape."""
    n = len(y)
    mask = np.zeros(rows, np.float32)
    mask[:n] = 1.0
    if n < rows:
        x = np.concatenate([x, np.zeros((rows - n, x.shape[1]), x.dtype)])
        y = np.concatenate([y, np.zeros(rows - n, y.dtype)])
    return x, y, mask


def padded_chunks(store: FeatureStore):
    """Chunks padded to the store's chunk_rows with a mask, so jit compiles once."""
    for feats, labels in store.iter_chunks():
        yield pad_rows(feats, labels, store.chunk_rows)


def solve_ridge_psd(xtx: np.ndarray, xty: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W ||XW - Y||^2 + ridge ||W||^2 from (possibly noisy) X^T X and X^T Y.

    The Gram matrix is symmetrised and projected onto the PSD cone by clipping
    negative eigenvalues (a noisy Gram matrix is indefinite), then the
    regularised system is solved in the eigenbasis.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    evals, evecs = np.linalg.eigh((xtx + xtx.T) / 2.0)
    evals = np.clip(evals, 0.0, None) + ridge
    if np.min(evals) <= 0:
        raise ValueError("ridge=0 with a singular Gram matrix; use ridge_lambda > 0")
    return evecs @ ((evecs.T @ xty) / evals[:, None])
