"""Shared helpers for the extraction tests: a tiny real dataset and store comparison."""

import json
from pathlib import Path

import numpy as np
import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
# A tiny, fast setting: Lite0 at 32 px on a few hundred Fashion-MNIST images.
TINY = dict(backbone_name="efficientnet_lite0", image_size=32)


def _store_files(root: Path) -> dict[str, bytes]:
    """Every file's bytes; the group's zarr.json without its (timing) extraction_stats, and
    the manifest without the checksums of that zarr.json and its recipe (chunk checksums
    are compared)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == ".snakemake_timestamp":  # Snakemake's, not ours
            continue
        data = p.read_bytes()
        if p == root / "zarr.json":
            meta = json.loads(data)
            meta["attributes"].pop("extraction_stats", None)
            data = json.dumps(meta, sort_keys=True).encode()
        if p == root / "manifest.json":
            manifest = json.loads(data)
            for key in ("metadata", "metadata_text"):
                manifest[key].pop("zarr.json")
            manifest.pop("manifest_sha256")
            manifest.pop("recipe")  # how it was invoked (workflow or library), not contents
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(p.relative_to(root))] = data
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    fa, fb = _store_files(Path(a)), _store_files(Path(b))
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, differ


@pytest.fixture
def assert_same_store():
    return _assert_same_store


@pytest.fixture(scope="session")
def fmnist_300():
    if not FMNIST.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    from pipeline_lib.data import load_dataset

    return load_dataset("fashion_mnist", "train", max_examples=300)


class VariableSizeSource:
    """Images of many sizes, grey or RGB, returned as a list (like image folders)."""

    name, split, source, num_classes = "toy", "train", "synthetic", 3

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = []
        for i in range(n):
            h, w = rng.integers(5, 60, size=2)
            shape = (h, w) if i % 3 == 0 else (h, w, 1) if i % 3 == 1 else (h, w, 3)
            self.images.append(rng.integers(0, 256, size=shape, dtype=np.uint8))
        self.labels = (np.arange(n) % 3).astype(np.int32)

    @property
    def num_examples(self):
        return len(self.images)

    def read(self, start, stop):
        return self.images[start:stop], self.labels[start:stop]


@pytest.fixture
def variable_size_source():
    return VariableSizeSource
