"""Data parallelism over the local devices, and throughput accounting for extraction.

Within one extraction job, every batch is split along its batch axis over all
local devices (one 1-D :class:`jax.sharding.Mesh` with axis ``"data"``) and the
backbone's variables are replicated on each of them. The computation of one
image never depends on another, so this changes which device computes a row,
not what is computed (to float rounding: XLA may pick other kernels for other
per-device batch shapes; features agree to ~1e-5 with a single-device run).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

__all__ = [
    "Throughput",
    "check_batch_size",
    "data_parallel_mesh",
    "flops_from_cost_analysis",
]


def data_parallel_mesh(num_devices: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A 1-D mesh (axis "data") over the first ``num_devices`` local devices (None: all)."""
    available = list(jax.local_devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(available):
            raise ValueError(
                f"extraction.num_devices={num_devices}, but this job sees {len(available)} "
                f"local device(s) ({available[0].platform}); use null for all of them"
            )
        available = available[:num_devices]
    return Mesh(np.array(available), ("data",))


def check_batch_size(batch_size: int, num_devices: int) -> None:
    """The batch is split evenly over the devices, so it must be a multiple of their count."""
    if batch_size < 1 or batch_size % num_devices:
        lower = max(num_devices, batch_size // num_devices * num_devices)
        upper = max(num_devices, -(-batch_size // num_devices) * num_devices)
        choices = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise ValueError(
            f"extraction.batch_size={batch_size} must be a positive multiple of the "
            f"{num_devices} local devices this job uses (each device gets batch_size/"
            f"{num_devices} images); set it to {choices}, or set "
            "extraction.num_devices"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def flops_from_cost_analysis(cost) -> float | None:
    """Total 'flops' from XLA's cost analysis, whatever shape this jax version returns.

    Older versions return a list with one dict per computation, newer ones a dict,
    and some backends None or an empty result. Returns None when it is unknown.
    """
    if cost is None:
        return None
    entries = cost if isinstance(cost, list | tuple) else [cost]
    total, found = 0.0, False
    for entry in entries:
        if not entry:
            continue
        try:
            value = entry.get("flops")
        except AttributeError:
            continue
        if value is not None and math.isfinite(float(value)) and float(value) >= 0:
            total += float(value)
            found = True
    return total if found else None


def lowered_flops(lowered) -> float | None:
    """FLOPs of a lowered (not yet partitioned) computation: the global count.

    A compiled SPMD executable reports one device's share, and ``lax.map`` or
    ``scan`` bodies are counted once, so callers lower a loop-free variant.
    """
    try:
        return flops_from_cost_analysis(lowered.cost_analysis())
    except Exception as exc:  # noqa: BLE001 - cost analysis is best-effort, never fatal
        log.warning("XLA cost analysis unavailable (%s); FLOP/s will not be reported", exc)
        return None


class Throughput:
    """Counts images and FLOPs of the steady state (after compilation) and logs them."""

    def __init__(self, *, flops_per_batch: float | None, batch_size: int, log_every_s: float = 30):
        self.flops_per_batch = flops_per_batch
        self.batch_size = batch_size
        self.log_every_s = log_every_s
        self.images = 0
        self.batches = 0
        self._t0 = time.perf_counter()
        self._last_log = self._t0

    def update(self, num_valid: int) -> None:
        self.images += num_valid
        self.batches += 1
        now = time.perf_counter()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            s = self.summary()
            log.info(
                "%d images, %.1f img/s, %s",
                self.images,
                s["images_per_second"],
                _fmt_flops(s["flop_per_second"]),
            )

    def summary(self) -> dict:
        seconds = time.perf_counter() - self._t0
        flops = None if self.flops_per_batch is None else self.flops_per_batch * self.batches
        return {
            "images": self.images,
            "batches": self.batches,
            "seconds": seconds,
            "images_per_second": self.images / seconds if seconds > 0 and self.images else 0.0,
            "flops_per_image": None
            if self.flops_per_batch is None
            else self.flops_per_batch / self.batch_size,
            "flop_per_second": None if flops is None or seconds <= 0 else flops / seconds,
        }


def _fmt_flops(value: float | None) -> str:
    return "FLOP/s unknown" if value is None else f"{value / 1e9:.2f} GFLOP/s"
