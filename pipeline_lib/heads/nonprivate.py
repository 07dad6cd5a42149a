"""Non-private baselines. NOT differentially private; labelled so everywhere.

They use the same bounded features as the private heads, so that the gap
between a private head and its baseline is the price of privacy alone.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pipeline_lib.features.store import FeatureStore
from pipeline_lib.heads.base import FEATURE_BOUND, NONNEGATIVE, POSITIVE, POSITIVE_INT, check_fields
from pipeline_lib.heads.linear import pad_rows, solve_ridge_psd
from pipeline_lib.heads.stats import SuffStats
from pipeline_lib.privacy.clipping import bound_rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class NonPrivateRidge:
    """Exact ridge regression on one-hot targets (the non-private DP-LS)."""

    l2_clip_norm: float = 1.0
    feature_transform: str = "normalize"
    ridge_lambda: float = 1.0

    name = "nonprivate_ridge"
    private = False

    def __post_init__(self):
        check_fields(self.name, self, {**FEATURE_BOUND, "ridge_lambda": POSITIVE})

    def hyperparameters(self) -> dict:
        return dataclasses.asdict(self)

    def fit(self, stats: SuffStats, *, seed: int = 0) -> dict[str, np.ndarray]:
        del seed  # deterministic
        if stats.l2_clip_norm != self.l2_clip_norm or stats.transform != self.feature_transform:
            raise ValueError(  # e.g. a cache file of another bound copied over this one
                f"{self.name}: statistics were computed with l2_clip_norm="
                f"{stats.l2_clip_norm}, transform={stats.transform!r}, but the head uses "
                f"{self.l2_clip_norm}, {self.feature_transform!r}"
            )
        weights = solve_ridge_psd(stats.xtx, stats.xty, self.ridge_lambda)
        return {
            "weights": weights.astype(np.float32),
            "bias": np.zeros(stats.num_classes, np.float32),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class NonPrivateLogistic:
    """Multinomial logistic regression with bias, by minibatch Adam over the streamed store.

    Memory stays O(chunk + dK): every epoch streams the store chunk by chunk,
    in a shuffled chunk order, with shuffled minibatches inside each chunk.
    """

    l2_clip_norm: float = 1.0
    feature_transform: str = "normalize"
    l2_penalty: float = 1e-5  # times ||W||^2 / 2, on the mean loss
    learning_rate: float = 0.01
    epochs: int = 30
    batch_size: int = 256

    name = "nonprivate_logistic"
    private = False

    def __post_init__(self):
        rules = {
            **FEATURE_BOUND,
            "l2_penalty": NONNEGATIVE,
            "learning_rate": POSITIVE,
            "epochs": POSITIVE_INT,
            "batch_size": POSITIVE_INT,
        }
        check_fields(self.name, self, rules)

    def hyperparameters(self) -> dict:
        return dataclasses.asdict(self)

    def fit(self, store: FeatureStore, *, seed: int = 0) -> dict[str, np.ndarray]:
        d, k = store.feature_dim, store.num_classes
        params = {"weights": jnp.zeros((d, k), jnp.float32), "bias": jnp.zeros(k, jnp.float32)}
        steps_per_epoch = sum(-(-n // self.batch_size) for n in store.chunk_sizes())
        schedule = optax.cosine_decay_schedule(self.learning_rate, self.epochs * steps_per_epoch)
        opt = optax.adam(schedule)
        state = opt.init(params)
        step = _make_step(opt, self.l2_clip_norm, self.feature_transform, self.l2_penalty, k)
        rng = np.random.default_rng(seed)
        for _ in range(self.epochs):
            for ci in rng.permutation(store.num_chunks):
                feats, labels = store.read_chunk(int(ci))
                order = rng.permutation(len(labels))
                for b0 in range(0, len(order), self.batch_size):
                    idx = order[b0 : b0 + self.batch_size]
                    x, y, mask = pad_rows(feats[idx], labels[idx], self.batch_size)
                    params, state = step(params, state, x, y, mask)
        return {k_: np.asarray(v) for k_, v in params.items()}


def _make_step(opt, l2_clip_norm, transform, l2_penalty, num_classes):
    def loss_fn(params, x, y, mask):
        xb = bound_rows(x, l2_clip_norm, transform)
        logits = xb @ params["weights"] + params["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        mean = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return mean + 0.5 * l2_penalty * jnp.sum(params["weights"] ** 2)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, x, y, mask):
        grads = jax.grad(loss_fn)(params, x, y, mask)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step
