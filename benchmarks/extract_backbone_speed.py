"""Measure EfficientNet-Lite feature-extraction throughput per depthwise implementation.

Usage:
  .venv/bin/python benchmarks/extract_backbone_speed.py --sizes 64,96,224 --batch 64

Every configuration (depthwise impl x chunk_pixels) is compiled first, then timed in
interleaved rounds (A, B, ..., A, B, ...), so that load from other processes on a shared
machine hits all of them alike. Reports, in images per second, the median and best round
of wall-clock throughput, and "cpu-normalised" throughput: images per CPU-second of this
process times the number of cores, i.e. what all cores would give if this process had
them to itself (an estimate: contention for caches and memory bandwidth still counts).
The load average is printed because wall-clock figures on a busy machine mean little
without it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import time

import jax
import numpy as np

from pipeline_lib.backbones import get_backbone
from pipeline_lib.backbones.efficientnet_lite import DEPTHWISE_IMPLS


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _time_round(fn, variables, images, min_seconds: float) -> tuple[float, float]:
    """(wall img/s, cpu-normalised img/s) over at least one call and ``min_seconds``."""
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while True:
        jax.block_until_ready(fn(variables, images))
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            cpu = time.process_time() - cpu_start
            images_done = calls * images.shape[0]
            return images_done / elapsed, images_done / cpu * os.cpu_count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", default="64,96,224", help="comma-separated image sizes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--impls", default=",".join(DEPTHWISE_IMPLS))
    parser.add_argument(
        "--chunk-pixels",
        default="none,131072",
        help="comma-separated EfficientNetLite.chunk_pixels values, or none",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per timed round")
    args = parser.parse_args()

    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"on {jax.devices()[0].platform}"
    )
    print(
        f"backbone: {args.backbone}, batch {args.batch}, {args.rounds} interleaved rounds of "
        f">= {args.min_seconds} s; load average at start: {os.getloadavg()}"
    )
    configs = list(
        itertools.product(
            args.impls.split(","),
            [None if c == "none" else int(c) for c in args.chunk_pixels.split(",")],
        )
    )
    rng = np.random.default_rng(0)
    variables = None
    print(
        "\n| image px | impl | chunk_pixels | wall img/s median | wall best | "
        "cpu-normalised median | compile+first call s |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        fns, compile_s = {}, {}
        raw = rng.integers(0, 256, (args.batch, size, size, 3)).astype(np.float32)
        for impl, chunk_pixels in configs:
            backbone = get_backbone(args.backbone, depthwise_impl=impl)
            if variables is None:
                variables = jax.device_put(backbone.load_variables()[0])
            images = jax.device_put(backbone.preprocess(raw))
            module = backbone.module.clone(chunk_pixels=chunk_pixels)
            fn = fns[impl, chunk_pixels] = jax.jit(module.apply)
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, images))
            compile_s[impl, chunk_pixels] = time.perf_counter() - start
        rates: dict[tuple, list[tuple[float, float]]] = {c: [] for c in configs}
        for _ in range(args.rounds):
            for config in configs:
                rates[config].append(_time_round(fns[config], variables, images, args.min_seconds))
        for config in configs:
            wall = [r[0] for r in rates[config]]
            cpu = [r[1] for r in rates[config]]
            print(
                f"| {size} | {config[0]} | {config[1] or 'none'} | "
                f"{statistics.median(wall):.1f} | {max(wall):.1f} | "
                f"{statistics.median(cpu):.1f} | {compile_s[config]:.1f} |",
                flush=True,
            )
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
