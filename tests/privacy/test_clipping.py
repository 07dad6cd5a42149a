"""Property tests: the norm bound that every sensitivity statement rests on."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline_lib.heads.stats import _chunk_stats
from pipeline_lib.privacy.clipping import bound_rows

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
# A few shapes, each drawn often: the property is about the values (every shape is its own
# XLA program, and compiling ~100 of them was most of these tests' time).
SHAPES = st.sampled_from([(1, 1), (1, 16), (3, 5), (8, 2), (8, 16)])
rows = arrays(np.float32, SHAPES, elements=finite)
clip = st.floats(1e-3, 1e3)


@settings(max_examples=200, deadline=None)
@given(x=rows, c=clip, transform=st.sampled_from(["clip", "normalize"]))
def test_rows_are_bounded(x, c, transform):
    out = np.asarray(bound_rows(x, c, transform))
    assert np.all(np.linalg.norm(out.astype(np.float64), axis=1) <= c)


@settings(max_examples=100, deadline=None)
@given(x=rows, c=clip)
def test_clip_leaves_short_rows_alone(x, c):
    out = np.asarray(bound_rows(x, c, "clip"))
    short = np.linalg.norm(x.astype(np.float64), axis=1) < 0.5 * c
    np.testing.assert_allclose(out[short], x[short], rtol=1e-5, atol=1e-30)  # XLA flushes denormals


def _stats(x, y, k, c, transform):
    mask = np.ones(len(y), np.float32)
    a, b, _ = _chunk_stats(x, y, mask, num_classes=k, l2_clip_norm=c, transform=transform)
    return np.asarray(a, np.float64), np.asarray(b, np.float64)


@settings(max_examples=100, deadline=None)
@given(
    x=arrays(np.float32, (6, 5), elements=finite),
    extra=arrays(np.float32, (1, 5), elements=finite),
    y=st.lists(st.integers(0, 2), min_size=7, max_size=7),
    c=st.floats(0.1, 10.0),
    transform=st.sampled_from(["clip", "normalize"]),
)
def test_adding_one_example_moves_stats_by_at_most_sensitivity(x, extra, y, c, transform):
    """X^T X moves by <= C^2 and X^T Y by <= C in Frobenius norm (DP-LS docstring)."""
    y = np.array(y, np.int32)
    a0, b0 = _stats(x, y[:6], 3, c, transform)
    a1, b1 = _stats(np.concatenate([x, extra]), y, 3, c, transform)
    # float32 accumulation: allow rounding relative to the magnitude of the sums
    tol = 1e-4 * (1 + np.abs(a1).max())
    assert np.linalg.norm(a1 - a0) <= c**2 + tol
    assert np.linalg.norm(b1 - b0) <= c + 1e-4 * (1 + np.abs(b1).max())


def test_without_clipping_the_bound_fails():
    """The test above can fail: an unclipped big row breaks the stated sensitivity."""
    x = np.full((1, 5), 100.0, np.float32)
    delta_xtx = np.linalg.norm(x.T @ x)
    assert delta_xtx > 1.0  # what clipping to C=1 prevents
    a, _ = _stats(x, np.zeros(1, np.int32), 2, 1.0, "clip")
    assert np.linalg.norm(a) <= 1.0


def test_bad_clip_norm():
    with pytest.raises(ValueError, match="l2_clip_norm"):
        bound_rows(np.ones((2, 2)), 0.0)
    with pytest.raises(ValueError, match="transform"):
        bound_rows(np.ones((2, 2)), 1.0, "whiten")


def test_clip_keeps_rows_whose_norm_underflows():
    """Found by hypothesis: ||x||^2 underflows to 0 in float32 for x ~ 2e-29."""
    x = np.full((1, 2), 1.9898773e-29, np.float32)
    np.testing.assert_array_equal(np.asarray(bound_rows(x, 0.5, "clip")), x)


def test_one_compiled_program_serves_every_bound():
    """The bounds are traced arguments of the jitted kernels: a new C (a new candidate of a
    sweep, a new hypothesis example) compiles nothing, and the bound is still checked."""
    import jax.monitoring

    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    x = np.full((4, 3), 2.0, np.float32)
    y, mask = np.zeros(4, np.int32), np.ones(4, np.float32)
    _chunk_stats(x, y, mask, num_classes=2, l2_clip_norm=1.0, transform="clip")  # compiled
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for c in (0.5, 3.25):
            a, _, _ = _chunk_stats(x, y, mask, num_classes=2, l2_clip_norm=c, transform="clip")
            assert np.trace(np.asarray(a)) <= 4 * c**2
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="l2_clip_norm"):
            _chunk_stats(x, y, mask, num_classes=2, l2_clip_norm=bad, transform="clip")
