"""Many head runs in one warm process: the entry point of the ``fit_head`` rule.

Snakemake still runs one job per run (so a finished run is never recomputed, ``-f`` on one
run's metrics.json reruns exactly that run, and a new epsilon or seed adds only its runs), but
the rule's ``run:`` body calls :func:`fit_run` inside the Snakemake process itself (with
``force-use-threads``, see profiles/default). What a cold process paid for every run is then
paid once per Snakemake process:

- Python and JAX imports, and XLA compilation (the heads' jitted functions are module-level,
  so their compile caches live as long as the process);
- opening and verifying the feature stores: :data:`STORES` keeps verified in-memory copies,
  keyed by the store's path *and* a fingerprint of every file in it (size and mtime), so a
  rewritten or damaged store is read and verified again, never served stale;
- noise calibration, which is a deterministic function of public quantities (the head's
  public config, epsilon, delta, N): :func:`calibrated` memoises it, so the seeds of one
  (method, epsilon) calibrate once.

Nothing secret is cached: every call of :func:`fit_run` draws its own base noise key from the
OS (`runner.noise_key`), builds its own DpEvent and writes its own metrics.json and head.npz.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline_lib.features.memory import ChunkedRows
from pipeline_lib.features.store import FeatureStore

__all__ = ["STORES", "StoreCache", "calibrated", "fit_run", "job_log", "store_fingerprint"]

log = logging.getLogger(__name__)
DEFAULT_CACHE_MB = 4096  # one Fashion-MNIST-size train+test pair at d=1280 is about 360 MB


def store_fingerprint(path: str | os.PathLike) -> tuple:
    """(relative path, size, mtime_ns) of every file of a store directory, sorted.

    A finalized store is published by one rename and never modified in place, so any change
    (a re-extraction, a damaged or replaced chunk file) changes this tuple.
    """
    root = Path(path)
    rows = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            rows.append(
                (os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns)
            )
    return (os.fspath(root.resolve()), *sorted(rows))


class LoadedStore(ChunkedRows):
    """A finished store read once, verified chunk by chunk, and held in memory (read-only)."""

    def __init__(self, store: FeatureStore):
        feats, labels = store.read_all()  # FeatureStore.read_chunk checks NaN/Inf and labels
        feats.setflags(write=False)
        labels.setflags(write=False)
        self.path, self.attrs = store.path, store.attrs
        self.content_digest = store.content_digest  # what stats files are bound to
        self.features, self.labels = feats, labels
        self.num_examples, self.feature_dim = store.num_examples, store.feature_dim
        self.num_classes, self.chunk_rows = store.num_classes, store.chunk_rows

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + self.labels.nbytes)

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self._bounds(chunk)
        return self.features[a:b], self.labels[a:b]

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        return self.features, self.labels


class StoreCache:
    """Verified feature stores kept in memory across the runs of one process (thread-safe).

    ``open(path)`` returns a :class:`LoadedStore` when the store fits in ``budget_mb`` (least
    recently used stores are dropped to make room), and a streaming :class:`FeatureStore`
    otherwise, so stage 2 stays out of core for stores that do not fit.
    """

    def __init__(self, budget_mb: float):
        self.budget_bytes = int(budget_mb * 2**20)
        self._lock = threading.Lock()
        self._stores: OrderedDict[str, tuple[tuple, LoadedStore]] = OrderedDict()
        self.loads = 0  # how many times a store was read from disk (tests, benchmarks)

    def open(self, path: str | os.PathLike):
        key = os.fspath(Path(path).resolve())
        store = FeatureStore(path)  # checks existence, completeness and shapes every time
        need = store.num_examples * (store.feature_dim + 1) * 4
        if need > self.budget_bytes:
            return store
        with self._lock:
            fingerprint = store_fingerprint(path)
            hit = self._stores.get(key)
            if hit is not None and hit[0] == fingerprint:
                self._stores.move_to_end(key)
                return hit[1]
            self._stores.pop(key, None)
            loaded = LoadedStore(store)
            self.loads += 1
            if store_fingerprint(path) != fingerprint:  # changed while we read it: do not keep
                return store
            while self._stores and self._used() + loaded.nbytes > self.budget_bytes:
                self._stores.popitem(last=False)
            self._stores[key] = (fingerprint, loaded)
            return loaded

    def _used(self) -> int:
        return sum(s.nbytes for _, s in self._stores.values())

    def clear(self) -> None:
        with self._lock:
            self._stores.clear()


STORES = StoreCache(float(os.environ.get("DP_STORE_CACHE_MB", DEFAULT_CACHE_MB)))

_CALIBRATIONS: dict[tuple, object] = {}
_CALIBRATION_LOCK = threading.Lock()


def calibrated(head, *, epsilon: float, delta: float, num_examples: int):
    """``head.calibrate(...)``, memoised on public inputs only (config, epsilon, delta, N).

    Calibration searches for a noise multiplier with the accountant; it is deterministic and
    draws no noise, so reusing its result across seeds releases nothing new.
    """
    key = (type(head).__qualname__, repr(head), float(epsilon), float(delta), int(num_examples))
    with _CALIBRATION_LOCK:
        hit = _CALIBRATIONS.get(key)
    if hit is None:
        hit = head.calibrate(epsilon=epsilon, delta=delta, num_examples=num_examples)
        with _CALIBRATION_LOCK:
            _CALIBRATIONS[key] = hit
    return hit


class _ThisThread(logging.Filter):
    def __init__(self):
        super().__init__()
        self.ident = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


@contextlib.contextmanager
def job_log(path: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """Send the log records of this thread (this job) to ``path`` while the block runs.

    Jobs run concurrently in threads of one process, so the handler keeps only records
    emitted by the calling thread.
    """
    logger = logging.getLogger("workflow")
    if path is None:
        yield logger
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(_ThisThread())
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield logger
    except BaseException:
        logger.exception("run failed")
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def fit_run(spec: dict, *, input, output, log_path=None) -> dict:  # noqa: A002
    """One run of rule fit_head, in this (warm) process: `runner.run_head` on cached stores."""
    from pipeline_lib.run_contract import RunSpec
    from pipeline_lib.runner import run_head  # imported here: the Snakefile must parse fast

    with job_log(log_path) as logger:
        record = run_head(
            RunSpec.from_dict(spec),  # checked before any store is opened
            train_store=input["train"],
            test_store=input["test"],
            metrics_path=output["metrics"],
            head_path=output["head"],
            public_train_store=input.get("public_train"),
            public_test_store=input.get("public_test"),
            open_store=STORES.open,
            calibrate=calibrated,
        )
        logger.info("%s", json.dumps(record, indent=2))
    return record


def compute_stats_run(
    train_store, *, output, part: str, l2_clip_norm: float, transform: str, log_path=None
) -> None:
    """One job of rule compute_stats (statistics are never released), on a cached store.

    ``part`` is "all", or "fit<f>": the training split minus a validation part f.
    """
    from pipeline_lib.features.split import RowSubset
    from pipeline_lib.heads.stats import compute_stats, save_stats

    with job_log(log_path) as logger:
        data = STORES.open(train_store)
        if part != "all":
            data = RowSubset(data, part="fit", fraction=float(part.removeprefix("fit")))
        stats = compute_stats(data, l2_clip_norm=l2_clip_norm, transform=transform)
        save_stats(stats, output)
        logger.info(
            "stats over %d examples (%s), d=%d, K=%d",
            stats.num_examples,
            part,
            stats.feature_dim,
            stats.num_classes,
        )
