"""Noise keys: one secret base key per job, one derived key per (release, class, step).

Threat model. An attacker holds every file this project publishes (everything
under ``results/``: metrics.json, head.npz, the run's path, the reports, the
logs) and this code. If the noise of a release could be recomputed from any
of that, the release would be a deterministic function of the data and its
(epsilon, delta) claim void. So the base of every key is **secret**:

* `NoiseKey.secret()` draws 64 bits from the operating system's CSPRNG
  (`secrets.token_bytes`), filling the whole state of a threefry2x32 key (two
  32-bit words). Nothing about it depends on the config, the run's identity or
  the clock, and it is never written anywhere: `repr`/`str` show no key
  material, pickling is refused, and the runner keeps it in memory only.
* A rerun of a job therefore draws new noise: it is a *new* release, and if
  both are published they compose (the ledger composes what is published).

Derivation below the base key is public and deterministic, which is what makes
independence testable: the key of one draw is

    base  <- fold(crc32(release name)) <- fold(class index) <- fold(step)

folded outside any traced function (or inside jit with explicit indices, see
`KeyStream`), so two draws never share a key unless all coordinates agree.
The public reference implementation read a single key inside a vmapped
function and so added the *same* noise to every class and every step.

Sub-jobs (tuning candidates, the noisy selection) get child keys by
`NoiseKey.child(label)`: a keyed BLAKE2b of the label under the parent's 64
secret bits, so children are as unpredictable as the parent.

Reproducible mode (`NoiseKey.reproducible(seed, *identity)`) derives the base
from a public seed and the run's identity instead. It exists for tests and
debugging only; anything made with it is NOT differentially private (the
noise can be regenerated from the config), and the runner labels every output
of such a run so.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

NOT_PRIVATE_NOTICE = "NOT differentially private: the noise can be regenerated from the config"
MODES = ("secret", "reproducible")


class NoiseKey:
    """The base of all noise of one job: 64 bits, secret unless made `reproducible`."""

    __slots__ = ("_words", "_reproducible")

    def __init__(self, words: tuple[int, int], *, reproducible: bool):
        hi, lo = (int(w) for w in words)
        if not (0 <= hi < 2**32 and 0 <= lo < 2**32):
            raise ValueError("a NoiseKey is two 32-bit words")
        self._words = (hi, lo)
        self._reproducible = bool(reproducible)

    @classmethod
    def secret(cls) -> NoiseKey:
        """64 fresh bits from the OS's cryptographic randomness (the default for DP runs)."""
        return cls._from_bytes(secrets.token_bytes(8), reproducible=False)

    @classmethod
    def reproducible(cls, seed: int, *identity: object) -> NoiseKey:
        """A key anyone can recompute from (seed, identity): for tests only, NOT private."""
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise TypeError(f"reproducible noise needs an integer seed, got {seed!r}")
        text = "\x1f".join(str(p) for p in (int(seed), *identity)).encode()
        digest = hashlib.blake2b(text, digest_size=8, person=b"dpf-noise-repro").digest()
        return cls._from_bytes(digest, reproducible=True)

    @classmethod
    def _from_bytes(cls, raw: bytes, *, reproducible: bool) -> NoiseKey:
        return cls(
            (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:8], "little")),
            reproducible=reproducible,
        )

    @property
    def is_reproducible(self) -> bool:
        """True when anyone holding the config can regenerate this key's noise."""
        return self._reproducible

    def child(self, *labels: object) -> NoiseKey:
        """An independent key for a sub-job (a tuning candidate, the selection, ...)."""
        secret = b"".join(w.to_bytes(4, "little") for w in self._words)
        text = "\x1f".join(str(p) for p in labels).encode()
        digest = hashlib.blake2b(
            text, digest_size=8, key=secret, person=b"dpf-noise-child"
        ).digest()
        return NoiseKey._from_bytes(digest, reproducible=self._reproducible)

    def numpy_generator(self, *labels: object) -> np.random.Generator:
        """A NumPy generator seeded from a child key: for draws that are not Gaussian
        noise (the number of trials of repeat-and-select, and which candidate each runs),
        as secret as the key itself."""
        child = self.child("numpy", *labels)
        return np.random.Generator(np.random.PCG64(child._words[0] << 32 | child._words[1]))

    def jax_key(self) -> jax.Array:
        """The base as a typed threefry2x32 JAX key (all 64 bits used)."""
        data = np.asarray(self._words, dtype=np.uint32)
        return jax.random.wrap_key_data(data, impl="threefry2x32")

    def __repr__(self) -> str:  # never show key material (logs, tracebacks)
        return "NoiseKey(reproducible)" if self._reproducible else "NoiseKey(<secret>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a NoiseKey is never pickled or written out")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseKey) and self._words == other._words

    def __hash__(self) -> int:
        return hash(self._words)


def require_key(key: object) -> NoiseKey:
    """`key` itself, or a TypeError that says how to make one (no silent int seeds)."""
    if not isinstance(key, NoiseKey):
        raise TypeError(
            f"noise needs a NoiseKey, got {type(key).__name__}: use NoiseKey.secret() "
            "(or NoiseKey.reproducible(seed) in tests, which is NOT private)"
        )
    return key


def release_base(key: NoiseKey, release: str) -> jax.Array:
    """The key of one named release: base <- crc32(release)."""
    base = require_key(key).jax_key()
    return jax.random.fold_in(base, zlib.crc32(release.encode()) & 0x7FFFFFFF)


def release_key(key: NoiseKey, release: str, *, index: int = 0, step: int = 0) -> jax.Array:
    """The key for one noise draw: base <- crc32(release) <- index <- step."""
    k = release_base(key, release)
    k = jax.random.fold_in(k, int(index))
    return jax.random.fold_in(k, int(step))


def gaussian(key: NoiseKey, release: str, shape, stddev: float, *, index: int = 0, step: int = 0):
    """N(0, stddev^2) noise of `shape` (float32 jax array)."""
    k = release_key(key, release, index=index, step=step)
    return stddev * jax.random.normal(k, shape, jnp.float32)


def gaussian_per_class(
    key: NoiseKey, release: str, num_classes: int, dim: int, stddev: float, *, step: int = 0
):
    """(num_classes, dim) noise whose row k is drawn with its own key (class index k)."""
    keys = jnp.stack([release_key(key, release, index=k, step=step) for k in range(num_classes)])
    return stddev * jax.vmap(lambda k: jax.random.normal(k, (dim,), jnp.float32))(keys)


def key_for_run(noise_config: dict | None, identity: tuple) -> NoiseKey:
    """The base key of one run from its experiment's ``noise`` setting.

    ``{mode: secret}`` (the default): fresh OS randomness, `identity` unused.
    ``{mode: reproducible, seed: s}``: derived from (s, identity), NOT private.
    """
    cfg = dict(noise_config or {"mode": "secret"})
    mode = cfg.get("mode", "secret")
    if mode == "secret":
        return NoiseKey.secret()
    if mode == "reproducible":
        return NoiseKey.reproducible(int(cfg.get("seed", 0)), *identity)
    raise ValueError(f"noise mode {mode!r} is unknown; use one of {list(MODES)}")


# ----------------------------------------------------------------- keys derived inside jit


class KeyStream:
    """Keys equal to `release_key(key, release, index=, step=)`, but derived inside jit,
    so that a per-class, per-step draw costs one dispatch instead of 4 K. Gradient noise
    for class k at step t is drawn with key (key, release, k, t): never shared across
    classes or steps."""

    def __init__(self, key: NoiseKey, release: str):
        self.base = release_base(key, release)
        self.release = release

    @staticmethod
    def derive(base, index, step):
        return jax.random.fold_in(jax.random.fold_in(base, index), step)

    def key(self, index: int, step: int):
        return _derive_jit(self.base, index, step)


_derive_jit = jax.jit(KeyStream.derive)


@partial(jax.jit, static_argnames=("num_classes", "dim"))
def per_class_normal(base, step, *, num_classes: int, dim: int):
    """(num_classes, dim) standard normals; row k drawn with key (base, index=k, step)."""
    keys = jax.vmap(lambda k: KeyStream.derive(base, k, step))(jnp.arange(num_classes))
    return jax.vmap(lambda kk: jax.random.normal(kk, (dim,), jnp.float32))(keys)
