"""map_in_threads: order, exceptions, and the default thread count."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline_lib.data.dataset import default_decode_threads, map_in_threads


@given(st.lists(st.integers(), max_size=40), st.integers(min_value=0, max_value=6))
def test_results_keep_item_order(items, threads):
    assert map_in_threads(lambda x: 2 * x, items, threads) == [2 * x for x in items]


def test_uses_several_threads():
    seen = set()
    barrier = threading.Barrier(3, timeout=30)

    def work(x):
        seen.add(threading.get_ident())
        barrier.wait()  # only passes if three items run at once
        return x

    assert map_in_threads(work, [1, 2, 3], 3) == [1, 2, 3]
    assert len(seen) == 3


def test_the_first_failing_item_raises():
    def work(x):
        if x in (3, 5):
            raise ValueError(f"bad {x}")
        return x

    with pytest.raises(ValueError, match="bad 3"):
        map_in_threads(work, list(range(8)), 4)


def test_default_thread_count():
    assert 1 <= default_decode_threads() <= 8
