"""Noise independence across releases, classes and steps."""

import jax
import numpy as np

from pipeline_lib.privacy import noise


def test_keys_differ_per_release_class_and_step():
    draws = {}
    for release in ("a", "b"):
        for index in range(3):
            for step in range(3):
                x = np.asarray(noise.gaussian(7, release, (4,), 1.0, index=index, step=step))
                draws[(release, index, step)] = tuple(np.round(x, 6))
    assert len(set(draws.values())) == len(draws)


def test_same_coordinates_same_noise():
    a = noise.gaussian(3, "r", (5,), 1.0, index=2, step=4)
    b = noise.gaussian(3, "r", (5,), 1.0, index=2, step=4)
    np.testing.assert_array_equal(a, b)


def correlation_between_classes(draw: np.ndarray) -> float:
    c = np.corrcoef(draw)
    return float(np.max(np.abs(c[~np.eye(len(c), dtype=bool)])))


def test_per_class_noise_is_independent():
    """Would catch the reference code's bug (one draw shared by every class)."""
    draw = np.asarray(noise.gaussian_per_class(0, "xty", num_classes=10, dim=20_000, stddev=1.0))
    assert draw.shape == (10, 20_000)
    # independent N(0,1) rows: |corr| ~ 1/sqrt(20000) = 0.007; shared noise gives 1.0
    assert correlation_between_classes(draw) < 0.05
    np.testing.assert_allclose(draw.std(axis=1), 1.0, rtol=0.03)
    shared = np.repeat(draw[:1], 10, axis=0)  # the reference bug, for contrast
    assert correlation_between_classes(shared) > 0.99


def test_steps_are_independent():
    a = np.asarray(noise.gaussian_per_class(0, "grad", 3, 20_000, 1.0, step=0))
    b = np.asarray(noise.gaussian_per_class(0, "grad", 3, 20_000, 1.0, step=1))
    assert correlation_between_classes(np.concatenate([a, b])) < 0.05


def test_seeds_above_32_bits_are_not_truncated():
    """jax.random.key keeps only 32 bits without x64; seed_key must not."""
    from pipeline_lib.privacy.noise import run_seed, seed_key

    low = 12345
    high = low + (7 << 32)
    a = jax.random.normal(seed_key(low), (4,))
    b = jax.random.normal(seed_key(high), (4,))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(
        jax.random.key_data(seed_key(low)), jax.random.key_data(jax.random.key(low))
    )
    # Runs differing only in epsilon, seed or candidate get different seeds.
    seeds = {
        run_seed("e", "d", "b", 32, "dp_ls", budget, s, *cand)
        for budget in ("eps1", "eps2")
        for s in (0, 1)
        for cand in ((), (0,), (1,))
    }
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
