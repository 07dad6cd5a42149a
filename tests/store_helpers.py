"""Write arrays into a finalized, verified feature store (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline_lib.features import store as fs


def write_array_store(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    dataset: str,
    split: str | None = None,
    chunk_rows: int = 256,
) -> Path:
    """A store of synthetic features with the attributes a backbone would record."""
    n, d = x.shape
    attrs = {
        "backbone": "synthetic",
        "checkpoint_sha256": "0" * 64,
        "preprocessing": "none",
        "image_size": 16,
        "dataset": dataset,
        "split": split if split is not None else Path(path).stem,
        "num_classes": int(num_classes),
    }
    fs.create_store(path, num_examples=n, feature_dim=d, chunk_rows=chunk_rows, attrs=attrs)
    for c in range(fs.num_chunks(n, chunk_rows)):
        a, b = fs.chunk_bounds(c, n, chunk_rows)
        fs.write_chunk(path, c, np.asarray(x[a:b], np.float32), np.asarray(y[a:b], np.int32))
    fs.finalize_store(path)
    return path
