"""Checksums written with an artifact and checked whenever it is read back.

Every artifact the workflow reads back (feature-store chunks and metadata,
cached statistics, ``head.npz``, ``metrics.json``, cached checkpoints) carries a
sha256 of its content, written at the same time as the content. Readers
recompute it and refuse anything that does not match, so a missing, truncated,
altered or swapped file stops the run with an :class:`IntegrityError` naming
the file, the fault and the one command that repairs it; it is never read as
data.

sha256 is used because OpenSSL computes it with the CPU's SHA extensions
(about 1 GB/s per core here, 2.7x blake2b); the cost against a stage-2 pass is
measured in ``benchmarks/verify_cost.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "ALGORITHM",
    "unreadable_npz",
    "FAULTS",
    "IntegrityError",
    "arrays_digest",
    "digest_bytes",
    "digest_file",
    "json_digest",
]

ALGORITHM = "sha256"
# missing: the file is gone; size: it has another length (truncated, extended);
# checksum: same length, other bytes (altered); mismatch: intact, but it belongs to
# other inputs (a file swapped in from another run); unreadable: not the format expected.
FAULTS = ("missing", "size", "checksum", "mismatch", "unreadable")
_BLOCK = 1 << 22


class IntegrityError(RuntimeError):
    """An artifact on disk is missing or damaged.

    Attributes: ``path`` (the file at fault), ``fault`` (one of :data:`FAULTS`) and
    ``repair`` (the command that repairs it). The message holds all three.
    """

    def __init__(self, path: str | os.PathLike, fault: str, detail: str, repair: str):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        self.path, self.fault, self.detail, self.repair = str(path), fault, detail, repair
        super().__init__(f"{path}: {fault}: {detail}. It was not used. Repair: {repair}")


def digest_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(payload: object) -> str:
    """sha256 of the canonical JSON text of ``payload`` (sorted keys, no spaces)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return digest_bytes(text.encode())


def arrays_digest(named: Mapping[str, object]) -> str:
    """sha256 over named arrays and scalars: name, dtype, shape and bytes of each, by name.

    Independent of the container format, so the digest of what a loader got back
    can be compared with the digest of what the writer meant to write.
    """
    h = hashlib.sha256()
    for name in sorted(named):
        a = np.ascontiguousarray(np.asarray(named[name]))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes() if a.dtype.kind != "U" else str(a).encode())
        h.update(b"\0")
    return h.hexdigest()


def unreadable_npz(path, exc: Exception, what: str, repair: str) -> IntegrityError:
    """The error for an .npz that numpy/zipfile could not read: altered bytes (a zip
    CRC-32 mismatch) are a checksum fault; anything else (truncated, not a zip) unreadable."""
    if "CRC" in str(exc):
        return IntegrityError(path, "checksum", f"its bytes were altered ({exc})", repair)
    return IntegrityError(path, "unreadable", f"not a readable {what} ({exc})", repair)


def check_file(path: Path, size: int | None, sha256: str | None, repair: str, what: str) -> bytes:
    """Read ``path`` and check it against the recorded ``size`` and ``sha256``; its bytes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(path, "missing", f"{what} is gone", repair) from None
    if size is not None and len(data) != size:
        raise IntegrityError(
            path, "size", f"{what} has {len(data)} bytes, {size} were written", repair
        )
    got = digest_bytes(data)
    if sha256 is not None and got != sha256:
        raise IntegrityError(
            path,
            "checksum",
            f"{what} does not match its recorded sha256 ({got[:12]}... != {sha256[:12]}...)",
            repair,
        )
    return data
