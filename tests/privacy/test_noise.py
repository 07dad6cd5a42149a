"""Noise independence across releases, classes and steps."""

import jax
import numpy as np
import pytest

from pipeline_lib.privacy import noise
from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private


def test_keys_differ_per_release_class_and_step():
    draws = {}
    for release in ("a", "b"):
        for index in range(3):
            for step in range(3):
                x = np.asarray(noise.gaussian(rk(7), release, (4,), 1.0, index=index, step=step))
                draws[(release, index, step)] = tuple(np.round(x, 6))
    assert len(set(draws.values())) == len(draws)


def test_same_coordinates_same_noise():
    a = noise.gaussian(rk(3), "r", (5,), 1.0, index=2, step=4)
    b = noise.gaussian(rk(3), "r", (5,), 1.0, index=2, step=4)
    np.testing.assert_array_equal(a, b)


def correlation_between_classes(draw: np.ndarray) -> float:
    c = np.corrcoef(draw)
    return float(np.max(np.abs(c[~np.eye(len(c), dtype=bool)])))


def test_per_class_noise_is_independent():
    """Would catch the reference code's bug (one draw shared by every class)."""
    draw = np.asarray(
        noise.gaussian_per_class(rk(0), "xty", num_classes=10, dim=20_000, stddev=1.0)
    )
    assert draw.shape == (10, 20_000)
    # independent N(0,1) rows: |corr| ~ 1/sqrt(20000) = 0.007; shared noise gives 1.0
    assert correlation_between_classes(draw) < 0.05
    np.testing.assert_allclose(draw.std(axis=1), 1.0, rtol=0.03)
    shared = np.repeat(draw[:1], 10, axis=0)  # the reference bug, for contrast
    assert correlation_between_classes(shared) > 0.99


def test_steps_are_independent():
    a = np.asarray(noise.gaussian_per_class(rk(0), "grad", 3, 20_000, 1.0, step=0))
    b = np.asarray(noise.gaussian_per_class(rk(0), "grad", 3, 20_000, 1.0, step=1))
    assert correlation_between_classes(np.concatenate([a, b])) < 0.05


def test_secret_key_fills_all_64_bits_from_os_randomness(monkeypatch):
    """The base key is exactly the 8 bytes the OS CSPRNG returned: both threefry words."""
    drawn = []

    def fake_token_bytes(n):
        drawn.append(n)
        return bytes([0x01, 0x02, 0x03, 0x04, 0xF5, 0xF6, 0xF7, 0xF8])

    monkeypatch.setattr(noise.secrets, "token_bytes", fake_token_bytes)
    key = NoiseKey.secret()
    assert drawn == [8]
    data = np.asarray(jax.random.key_data(key.jax_key()))
    np.testing.assert_array_equal(data, np.array([0x04030201, 0xF8F7F6F5], np.uint32))
    assert not key.is_reproducible


def test_secret_keys_are_fresh_and_independent_of_everything_public():
    keys = [NoiseKey.secret() for _ in range(64)]
    assert len(set(keys)) == 64
    words = np.array([np.asarray(jax.random.key_data(k.jax_key())) for k in keys])
    # high bits are used in both words (not a 32-bit or 63-bit seed folded in)
    assert (words[:, 0] >= 2**31).any() and (words[:, 1] >= 2**31).any()
    a = np.asarray(noise.gaussian(keys[0], "dp_ls/xtx", (8,), 1.0))
    b = np.asarray(noise.gaussian(keys[1], "dp_ls/xtx", (8,), 1.0))
    assert not np.allclose(a, b)


def test_key_material_never_shows_in_repr_or_pickle():
    import pickle

    key = NoiseKey.secret()
    assert repr(key) == str(key) == "NoiseKey(<secret>)"
    assert repr(rk(3)) == "NoiseKey(reproducible)"
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(key)


def test_ints_are_refused_where_a_key_is_needed():
    with pytest.raises(TypeError, match="NoiseKey"):
        noise.gaussian(7, "r", (2,), 1.0)


def test_children_are_distinct_and_keep_the_mode():
    base = NoiseKey.secret()
    kids = {base.child("cand", g) for g in range(5)} | {base.child("selection")}
    assert len(kids) == 6 and base not in kids
    assert all(not k.is_reproducible for k in kids)
    assert rk(0).child("x").is_reproducible
    assert rk(0).child("x") == rk(0).child("x")  # reproducible all the way down


def test_reproducible_keys_depend_on_seed_and_identity():
    ident = ("exp", "fashion_mnist", "lite0", 32, "dp_ls", "eps1", 0)
    assert rk(0, *ident) == rk(0, *ident)
    others = {rk(1, *ident), rk(0, *ident[:-1], 1), rk(0, *ident[:5], "eps2", 0)}
    assert len(others | {rk(0, *ident)}) == 4
    assert noise.key_for_run({"mode": "reproducible", "seed": 0}, ident) == rk(0, *ident)
    assert not noise.key_for_run({"mode": "secret"}, ident).is_reproducible
    assert not noise.key_for_run(None, ident).is_reproducible
    with pytest.raises(ValueError, match="unknown"):
        noise.key_for_run({"mode": "public"}, ident)
