"""Fixtures shared across test folders."""

import shutil
from pathlib import Path

import pytest

FAULTS = ("delete", "truncate", "flip", "swap")


def _inject(fault: str, target: Path, other: Path | None) -> None:
    """Damage `target` on disk: delete it, cut it in half, flip one byte, or replace it
    with `other` (the same file from another run)."""
    if fault == "delete":
        target.unlink()
    elif fault == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif fault == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif fault == "swap":
        shutil.copyfile(other, target)
    else:
        raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")


@pytest.fixture
def inject_fault():
    """The fault injector of the fault-injection tables (tests/features, tests/)."""
    return _inject
