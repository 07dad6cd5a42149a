"""What checking every chunk's sha256 costs, against a stage-2 pass over the store.

    .venv/bin/python benchmarks/verify_cost.py --workdir /tmp/verify_bench   # N=60k, d=1280

Writes a synthetic store once (nonnegative ReLU-like features, so zstd compresses
them about as much as real pre-logits; chunks of 1024 rows, the config default),
then times, interleaved over ``--repeats`` rounds:

* ``verified``: the statistics pass of stage 2 (X^T X, X^T Y) through `FeatureStore`,
  which opens the manifest, checks every chunk file's size, and checks each chunk's
  sha256 before decoding it (the next chunk is read and checked in a background
  thread while this one is accumulated);
* ``unverified``: the same pass reading chunks through Zarr, as before checksums;
* ``hash only``: sha256 of every chunk file, in one thread: the verification work
  itself, an upper bound on its cost if nothing overlapped.

Prints JSON lines and a summary; record it in benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, *, num_examples: int, feature_dim: int, num_classes: int, rows: int):
    from pipeline_lib.features import store as fs

    if path.exists():
        return
    attrs = dict(
        backbone="synthetic",
        checkpoint_sha256="0" * 64,
        preprocessing="none",
        image_size=0,
        dataset="synthetic",
        split="train",
        num_classes=num_classes,
    )
    fs.create_store(
        path, num_examples=num_examples, feature_dim=feature_dim, chunk_rows=rows, attrs=attrs
    )
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(num_classes, feature_dim)).astype(np.float32)
    for c in range(fs.num_chunks(num_examples, rows)):
        a, b = fs.chunk_bounds(c, num_examples, rows)
        y = rng.integers(0, num_classes, b - a).astype(np.int32)
        x = np.clip(centers[y] + rng.normal(size=(b - a, feature_dim)), 0, 6).astype(np.float32)
        fs.write_chunk(path, c, x, y)
    fs.finalize_store(path)


class ZarrReader:
    """The read path before checksums: chunks straight from Zarr, no verification."""

    def __init__(self, path: Path):
        import zarr

        self.group = zarr.open_group(str(path), mode="r")
        a = self.group.attrs
        self.num_examples, self.feature_dim = int(a["num_examples"]), int(a["feature_dim"])
        self.num_classes, self.chunk_rows = int(a["num_classes"]), int(a["chunk_rows"])

    def iter_chunks(self):
        for start in range(0, self.num_examples, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.num_examples)
            yield self.group["features"][start:stop], self.group["labels"][start:stop]


def hash_only(path: Path) -> int:
    from pipeline_lib import integrity

    manifest = json.loads((path / "manifest.json").read_text())
    total = 0
    for rec in manifest["chunks"]:
        for a in ("features", "labels"):
            p = path / rec[a]["key"]
            total += p.stat().st_size
            integrity.digest_file(p)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/verify_bench")
    parser.add_argument("--num-examples", type=int, default=60_000)
    parser.add_argument("--feature-dim", type=int, default=1280)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from pipeline_lib.features.store import FeatureStore
    from pipeline_lib.heads.stats import compute_stats

    path = Path(args.workdir) / f"n{args.num_examples}-d{args.feature_dim}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_store(
        path,
        num_examples=args.num_examples,
        feature_dim=args.feature_dim,
        num_classes=args.num_classes,
        rows=args.chunk_rows,
    )
    kw = dict(l2_clip_norm=1.0, transform="clip")
    compute_stats(ZarrReader(path), **kw)  # compile once, warm the page cache
    runs = {
        "verified": lambda: compute_stats(FeatureStore(path), **kw),
        "unverified": lambda: compute_stats(ZarrReader(path), **kw),
        "hash only": lambda: hash_only(path),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            if name == "verified":
                ref = out
            if name == "unverified":
                np.testing.assert_array_equal(out.xtx, ref.xtx)  # same numbers either way
    best = {k: min(v) for k, v in times.items()}
    stored = hash_only(path)
    record = {
        "num_examples": args.num_examples,
        "feature_dim": args.feature_dim,
        "chunk_rows": args.chunk_rows,
        "stored_mb": stored / 1e6,
        "seconds": times,
        "best_seconds": best,
        "hash_mb_per_s": stored / 1e6 / best["hash only"],
        "hash_share_of_pass": best["hash only"] / best["unverified"],
        "verified_over_unverified": best["verified"] / best["unverified"] - 1.0,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
    }
    print(json.dumps(record))
    print(
        f"stage-2 statistics pass: verified {best['verified']:.2f} s, unverified "
        f"{best['unverified']:.2f} s ({100 * record['verified_over_unverified']:+.1f}%); "
        f"hashing alone {best['hash only']:.2f} s = {100 * record['hash_share_of_pass']:.1f}% "
        f"of the pass ({record['hash_mb_per_s']:.0f} MB/s over {record['stored_mb']:.0f} MB)"
    )


if __name__ == "__main__":
    main()
