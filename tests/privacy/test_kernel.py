"""The privacy kernel is the only place that clips, samples, draws noise or builds events."""

import doctest
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.privacy import clipping, events

LIB = Path(__file__).resolve().parents[2] / "pipeline_lib"
FORBIDDEN = re.compile(
    r"jax\.random\.(normal|uniform|bernoulli|choice|permutation)|random\.normal\(|DpEvent\("
)


def test_no_noise_sampling_or_events_outside_the_kernel():
    offenders = []
    for path in LIB.rglob("*.py"):
        if path.parent.name == "privacy" or "backbones" in path.parts:
            continue  # backbones never touch private data
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(LIB)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_one_clipping_margin():
    for path in LIB.rglob("*.py"):
        if path.name != "clipping.py":
            assert not re.search(r"SHRINK\s*=", path.read_text()), path


def test_event_doctests():
    result = doctest.testmod(events, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=16),
    st.floats(1e-3, 1e3),
)
def test_clip_l2_bounds_every_row(values, bound):
    x = jnp.asarray(np.array(values, np.float32).reshape(1, -1))
    out = np.asarray(clipping.clip_l2(x, bound))
    assert np.linalg.norm(out.astype(np.float64)) <= bound
    norm = float(np.linalg.norm(np.asarray(values, np.float64)))
    if norm <= bound * clipping.SHRINK * (1 - 1e-6):  # short rows are left as they are
        # XLA on CPU flushes subnormal floats to zero: a change below float32's smallest
        # normal number is not a clipping (and only shortens the row)
        tiny = np.finfo(np.float32).tiny
        np.testing.assert_allclose(out[0], np.asarray(values, np.float32), rtol=1e-6, atol=tiny)
