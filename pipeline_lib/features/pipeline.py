"""Host input pipeline: read, resize and pad image batches ahead of the device.

Extraction alternates host work (a source's ``read``: JPEG decoding for image
folders and ImageNet, resizing of variable-size images) with device work (the
jitted forward pass). :class:`Prefetcher` runs the host side in background
threads so that the two overlap: while the device computes batch k, the
threads prepare batches k+1 .. k+depth.

Guarantees, all tested:

- Order is preserved: items come out in the order of the input sequence,
  whatever the number of worker threads.
- Bounded memory: at most ``depth`` batches are prepared ahead of the consumer.
- Errors propagate: an exception raised while preparing an item is raised in
  the consumer's thread, from ``next()``, as the same exception object with its
  original traceback (the worker's frames are kept).
- Clean shutdown: leaving the ``with`` block (normally, on an error, or on
  KeyboardInterrupt) cancels queued work, waits for the items being prepared
  and joins every thread, so no thread outlives the prefetcher.

Resizing policy (:func:`resize_on_host`): a source that declares one fixed
``image_shape`` (every in-memory :class:`~pipeline_lib.data.ImageDataset`)
sends its uint8 images unresized; the device resizes them inside the jitted
function (``extract.to_model_input``), as before. Any other source (TFDS
ImageNet, image folders: images of many sizes) is resized on the host, every
batch alike, so that one dataset never mixes the two resizers. Both resizers
follow the backbone's :class:`~pipeline_lib.backbones.preprocessing.Preprocessing`
(the checkpoint family's resize method, antialiasing, crop and rounding). Host
batches are uint8 when the family rounds resized pixels to uint8 and float32
when it keeps them in float. Grey images are repeated to RGB on the host so
that a batch always has one shape.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from pipeline_lib.backbones.preprocessing import PRESETS, Preprocessing

__all__ = [
    "Batch",
    "Prefetcher",
    "batch_ranges",
    "make_batch",
    "resize_image",
    "resize_on_host",
]

T = TypeVar("T")
R = TypeVar("R")


class Prefetcher(Generic[R]):
    """Apply ``fn`` to each item of ``items`` in background threads; iterate results in order.

    Use it as a context manager so that threads are always joined::

        with Prefetcher(load, ranges, depth=4) as batches:
            for batch in batches:
                ...

    Args:
      fn: the host work for one item (for example, read and resize one batch).
      items: the inputs, consumed lazily.
      depth: how many results may be prepared ahead of the consumer (>= 1).
      workers: worker threads (>= 1, at most ``depth``). One thread suffices when
        ``fn`` is cheap; more help when it decodes images (Pillow releases the GIL).
        ``fn`` must then be safe to call from several threads at once.
    """

    def __init__(
        self, fn: Callable[[T], R], items: Iterable[T], *, depth: int = 2, workers: int = 1
    ):
        if depth < 1 or workers < 1:
            raise ValueError(f"prefetch depth={depth} and workers={workers} must both be >= 1")
        self._fn = fn
        self._items = iter(items)
        self._depth = depth
        self._workers = min(workers, depth)
        self._pending: collections.deque[concurrent.futures.Future[R]] = collections.deque()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._exhausted = False

    def __enter__(self) -> Prefetcher[R]:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="prefetch"
        )
        self._fill()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[R]:
        return self

    def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
                break
            self._pending.append(self._pool.submit(self._fn, item))

    def __next__(self) -> R:
        if self._pool is None:
            raise RuntimeError("use Prefetcher as a context manager: `with Prefetcher(...) as it:`")
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        result = future.result()  # re-raises the worker's exception with its traceback
        self._fill()
        return result

    def close(self) -> None:
        """Cancel queued work, wait for running items, join the threads. Idempotent."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._exhausted = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One fixed-shape batch of rows [start, stop) of a chunk, padded to the batch size.

    ``images`` is uint8 (batch_size, H, W[, C]); rows past ``stop - start`` are zeros.
    """

    chunk: int
    start: int
    stop: int
    images: np.ndarray
    labels: np.ndarray  # int32 (stop - start,)

    @property
    def num_valid(self) -> int:
        return self.stop - self.start


def batch_ranges(
    chunk_bounds: Sequence[tuple[int, int, int]], batch_size: int
) -> Iterator[tuple[int, int, int]]:
    """(chunk, start, stop) of every batch: each chunk is cut into batches of ``batch_size``.

    Batches never straddle chunks, so a chunk's bytes depend only on its own rows.
    """
    for chunk, start, stop in chunk_bounds:
        for b0 in range(start, stop, batch_size):
            yield chunk, b0, min(b0 + batch_size, stop)


def resize_on_host(source) -> bool:
    """Whether batches of ``source`` are resized on the host (see the module docstring)."""
    shape = getattr(source, "image_shape", None)
    return not (isinstance(shape, tuple) and len(shape) in (2, 3))


def resize_image(
    image: np.ndarray, image_size: int, preprocessing: Preprocessing | None = None
) -> np.ndarray:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> (S, S, 3) as ``preprocessing`` resizes
    (default: the EfficientNet-Lite preset, Pillow bilinear rounded to uint8)."""
    prep = PRESETS["efficientnet_lite"] if preprocessing is None else preprocessing
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype} with shape {image.shape}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(
            f"images must be (H, W), (H, W, 1) or (H, W, 3) uint8, got shape {image.shape}"
        )
    return prep.resize_host(image, image_size)


def make_batch(
    source,
    chunk: int,
    start: int,
    stop: int,
    *,
    batch_size: int,
    image_size: int,
    host_resize: bool,
    preprocessing: Preprocessing | None = None,
) -> Batch:
    """Read rows [start, stop) of ``source``, resize on the host if asked, pad to batch_size."""
    n = stop - start
    if not 0 < n <= batch_size:
        raise ValueError(f"rows [{start}, {stop}) do not fit in a batch of {batch_size}")
    images, labels = source.read(start, stop)
    labels = np.asarray(labels)
    if len(images) != n or labels.shape != (n,):
        raise ValueError(
            f"{getattr(source, 'name', 'source')}: read({start}, {stop}) returned "
            f"{len(images)} images and labels of shape {labels.shape}; expected {n} of each"
        )
    if host_resize:
        stacked = np.stack([resize_image(im, image_size, preprocessing) for im in images])
    elif isinstance(images, np.ndarray):
        stacked = images
    else:
        raise ValueError(
            f"{getattr(source, 'name', 'source')}: declares image_shape "
            f"{getattr(source, 'image_shape', None)} but read({start}, {stop}) returned a list "
            "of images; a source with a fixed image shape must return a stacked array"
        )
    if stacked.dtype != np.uint8 and not (host_resize and stacked.dtype == np.float32):
        raise ValueError(f"images must be uint8, got {stacked.dtype}")
    if n < batch_size:  # pad to the compiled shape; padded rows are dropped after the forward pass
        pad = np.zeros((batch_size - n, *stacked.shape[1:]), stacked.dtype)
        stacked = np.concatenate([stacked, pad])
    return Batch(chunk, start, stop, np.ascontiguousarray(stacked), labels.astype(np.int32))
