"""Checks for one ``datasets.<key>`` config entry, shared by the sources.

The JSON schema already rejects most bad entries when Snakemake loads the
config; these checks repeat the ones that matter so that library callers (tests,
notebooks) get the same clear errors, each naming ``datasets.<key>.<option>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "SPLITS",
    "check_keys",
    "check_split",
    "max_examples",
    "optional_bool",
    "optional_int",
    "optional_str",
    "split_mapping",
]

SPLITS = ("train", "test")


def check_keys(where: str, spec: Mapping, allowed: Iterable[str], source: str) -> None:
    """Reject keys that source ``source`` does not understand, naming each one."""
    allowed = set(allowed)
    extra = sorted(str(key) for key in spec if key not in allowed)
    if extra:
        names = ", ".join(f"{where}.{key}" for key in extra)
        raise ValueError(
            f"{names}: not an option of source {source!r}; "
            f"its options are {', '.join(sorted(allowed))}"
        )


def optional_int(where: str, spec: Mapping, key: str, *, minimum: int = 1) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{where}.{key}: must be an integer or null, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return int(value)


def optional_str(where: str, spec: Mapping, key: str, default: str | None) -> str | None:
    value = spec.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise TypeError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def optional_bool(where: str, spec: Mapping, key: str, default: bool = False) -> bool:
    value = spec.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TypeError(f"{where}.{key}: must be true or false, got {value!r}")
    return value


def max_examples(where: str, spec: Mapping, split: str) -> int | None:
    """``max_<split>_examples`` from the spec: a positive int or None (the whole split)."""
    return optional_int(where, spec, f"max_{split}_examples")


def split_mapping(where: str, spec: Mapping, defaults: Mapping[str, str]) -> dict[str, Any]:
    """``splits``: our split names (train, test) mapped to the source's; defaults filled in."""
    value = spec.get("splits")
    if value is None:
        return dict(defaults)
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{where}.splits: must be a mapping like {{train: train, test: validation}}, "
            f"got {value!r}"
        )
    result = dict(defaults)
    for ours, theirs in value.items():
        if ours not in SPLITS:
            raise ValueError(
                f"{where}.splits.{ours}: unknown split; the keys are our split names "
                f"{', '.join(SPLITS)}"
            )
        if not isinstance(theirs, str) or not theirs:
            raise TypeError(f"{where}.splits.{ours}: must be a non-empty string, got {theirs!r}")
        result[ours] = theirs
    return result


def check_split(where: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{where}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
