"""Gaussian noise with one PRNG key per (run seed, release, class, step).

The public reference implementation read a single key inside a vmapped
function and so added the *same* noise to every class, and (after the first
trace) at every step. Here each draw's key is derived by folding the release
name, the class index and the step into the run's key, outside any traced
function, so two draws never share a key unless all four coordinates agree.
"""

from __future__ import annotations

import hashlib
import zlib

import jax
import jax.numpy as jnp

MAX_SEED = 2**63 - 1


def seed_key(seed: int) -> jax.Array:
    """The run's base key. Seeds are ints in [0, 2**63): ``jax.random.key`` alone
    silently keeps only the low 32 bits without x64, so the high bits are folded in
    separately (seeds below 2**32 give exactly ``jax.random.key(seed)``)."""
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"noise seed must be in [0, 2**63), got {seed}")
    key = jax.random.key(seed & 0xFFFFFFFF)
    if seed >> 32:
        key = jax.random.fold_in(key, seed >> 32)
    return key


def run_seed(*parts: object) -> int:
    """A 63-bit noise seed from a run's identity (experiment, dataset, ..., seed, candidate).

    Every release of every run then draws from its own key: two runs that differ
    only in epsilon never reuse one standard-normal draw at two scales (which
    would let anyone subtract the noise), so composing them in the ledger is valid.
    """
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def release_key(seed: int, release: str, *, index: int = 0, step: int = 0) -> jax.Array:
    """The key for one noise draw: seed_key(seed) <- crc32(release) <- index <- step."""
    key = seed_key(seed)
    key = jax.random.fold_in(key, zlib.crc32(release.encode()) & 0x7FFFFFFF)
    key = jax.random.fold_in(key, int(index))
    return jax.random.fold_in(key, int(step))


def gaussian(seed: int, release: str, shape, stddev: float, *, index: int = 0, step: int = 0):
    """N(0, stddev^2) noise of `shape` (float64 numpy-compatible jax array)."""
    key = release_key(seed, release, index=index, step=step)
    return stddev * jax.random.normal(key, shape, jnp.float32)


def gaussian_per_class(
    seed: int, release: str, num_classes: int, dim: int, stddev: float, *, step: int = 0
):
    """(num_classes, dim) noise whose row k is drawn with its own key (class index k)."""
    keys = jnp.stack([release_key(seed, release, index=k, step=step) for k in range(num_classes)])
    return stddev * jax.vmap(lambda k: jax.random.normal(k, (dim,), jnp.float32))(keys)
