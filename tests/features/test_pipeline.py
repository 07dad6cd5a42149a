"""The host input pipeline: order, bounded prefetch, error propagation, shutdown, resizing."""

import threading
import time
import traceback

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.features import pipeline as pipe


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


@pytest.fixture(autouse=True)
def no_leftover_threads():
    yield
    assert _prefetch_threads() == []


@pytest.mark.parametrize("workers", [1, 3])
def test_order_preserved_with_uneven_work(workers):
    def slow_square(i):
        time.sleep(0.002 * ((7 * i) % 5))  # later items often finish first
        return i * i

    with pipe.Prefetcher(slow_square, range(40), depth=4, workers=workers) as it:
        assert list(it) == [i * i for i in range(40)]


def test_prefetch_is_bounded():
    started = []

    def record(i):
        started.append(i)
        return i

    with pipe.Prefetcher(record, range(100), depth=3) as it:
        first = next(it)
        time.sleep(0.05)
        assert first == 0
        assert len(started) <= 1 + 3  # the consumed item plus at most `depth` ahead


def _fail_at_5(i):
    if i == 5:
        raise ValueError("bad image at row 5")
    return i


def test_error_propagates_with_original_traceback():
    got = []
    with pytest.raises(ValueError, match="bad image at row 5") as info:
        with pipe.Prefetcher(_fail_at_5, range(20), depth=2, workers=2) as it:
            for x in it:
                got.append(x)
    assert got == [0, 1, 2, 3, 4]  # everything before the failure, in order
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "_fail_at_5" in frames  # the worker's frame is kept


def test_consumer_error_and_interrupt_shut_down_cleanly():
    for exc in (RuntimeError("device failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with pipe.Prefetcher(lambda i: time.sleep(0.01) or i, range(1000), depth=4) as it:
                next(it)
                raise exc
        assert _prefetch_threads() == []


def test_requires_context_manager_and_valid_depth():
    with pytest.raises(RuntimeError, match="context manager"):
        next(pipe.Prefetcher(lambda i: i, range(3)))
    with pytest.raises(ValueError, match="depth=0"):
        pipe.Prefetcher(lambda i: i, range(3), depth=0)


def test_batch_ranges_never_straddle_chunks():
    bounds = [(0, 0, 10), (1, 10, 20), (2, 20, 23)]
    assert list(pipe.batch_ranges(bounds, 4)) == [
        (0, 0, 4), (0, 4, 8), (0, 8, 10),
        (1, 10, 14), (1, 14, 18), (1, 18, 20),
        (2, 20, 23),
    ]  # fmt: skip


def test_variable_sizes_are_resized_on_host_and_padded(variable_size_source):
    src = variable_size_source(11)
    assert pipe.resize_on_host(src)
    batch = pipe.make_batch(src, 2, 5, 11, batch_size=8, image_size=16, host_resize=True)
    assert batch.images.shape == (8, 16, 16, 3) and batch.images.dtype == np.uint8
    assert batch.num_valid == 6 and batch.labels.tolist() == src.labels[5:11].tolist()
    assert not batch.images[6:].any()  # padding is zeros
    grey = src.images[6]  # i % 3 == 0: a (h, w) grey image becomes equal R, G, B
    out = batch.images[1]
    assert (
        grey.ndim == 2 and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    )


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    c=st.sampled_from([None, 1, 3]),
    s=st.integers(4, 24),
)
def test_resize_image_shape_and_constant_images(h, w, c, s):
    shape = (h, w) if c is None else (h, w, c)
    value = (h * 7 + w) % 256
    out = pipe.resize_image(np.full(shape, value, np.uint8), s)
    assert out.shape == (s, s, 3) and out.dtype == np.uint8
    assert (out == value).all()  # bilinear resizing keeps a constant image constant


def test_resize_image_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pipe.resize_image(np.zeros((4, 4), np.float32), 8)
    with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
        pipe.resize_image(np.zeros((4, 4, 2), np.uint8), 8)


def test_fixed_shape_source_keeps_device_resize():
    class Fixed:
        image_shape = (28, 28)

        def read(self, start, stop):
            return np.ones((stop - start, 28, 28), np.uint8), np.zeros(stop - start, np.int32)

    assert not pipe.resize_on_host(Fixed())
    batch = pipe.make_batch(Fixed(), 0, 0, 3, batch_size=4, image_size=64, host_resize=False)
    assert batch.images.shape == (4, 28, 28)  # resized later, on the device


def test_short_read_is_an_error(variable_size_source):
    class Short(variable_size_source):
        def read(self, start, stop):
            return self.images[start : stop - 1], self.labels[start:stop]

    with pytest.raises(ValueError, match=r"read\(0, 4\) returned 3 images"):
        pipe.make_batch(Short(6), 0, 0, 4, batch_size=4, image_size=8, host_resize=True)
