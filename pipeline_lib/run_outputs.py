"""A head run's outputs, head.npz and metrics.json, written with checksums and verified on read.

* ``head.npz`` holds the weights, the bias, the run record as JSON (``metadata``),
  for a head with private centring the released feature mean (``center``), and
  ``content_sha256``, the sha256 of those (`integrity.arrays_digest`).
* ``metrics.json`` holds the run record plus ``head_sha256`` (the sha256 of the
  head.npz file's bytes) and ``content_sha256`` (of its own other keys).

So each file checks itself, and metrics.json binds the pair: a head.npz copied
in from another run (intact, but another release) is caught too. head.npz is
written first and metrics.json last, each by atomic rename: a run with a
metrics file is a finished run. `verify_run` is what the report steps call on
every run they read.

Repair: delete both files and rerun the workflow, which refits that run only.
For a private run the refit draws fresh noise, so it is a new release; if the
damaged head had already been published, both releases count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from pipeline_lib import integrity

__all__ = ["head_repair_command", "verify_run", "verify_runs", "write_run_outputs"]

HEAD_NAME = "head.npz"


def head_repair_command(metrics_path: str | os.PathLike) -> str:
    head = Path(metrics_path).with_name(HEAD_NAME)
    return f"rm -f {head} {os.fspath(metrics_path)} && snakemake --cores all"


def head_members(weights, bias, metadata_json: str, center=None) -> dict:
    """The checksummed arrays of head.npz; ``center`` (the released feature mean of a head
    with private centring) only when there is one, so other heads are unchanged."""
    members = dict(
        weights=np.asarray(weights), bias=np.asarray(bias), metadata=np.asarray(metadata_json)
    )
    if center is not None:
        members["center"] = np.asarray(center, np.float32)
    return members


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_run_outputs(
    head_path: str | os.PathLike,
    metrics_path: str | os.PathLike,
    params: Mapping[str, np.ndarray],
    record: dict,
) -> None:
    """Write head.npz (weights, bias, record, checksum), then metrics.json (record + checksums)."""
    head_path, metrics_path = Path(head_path), Path(metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    members = head_members(
        params["weights"],
        params["bias"],
        json.dumps(record, sort_keys=True),
        center=params.get("center"),
    )
    digest = np.asarray(integrity.arrays_digest(members))

    def write_head(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, content_sha256=digest, **members)

    _atomic(head_path, write_head)
    metrics = dict(record, head_sha256=integrity.digest_file(head_path))
    metrics["content_sha256"] = integrity.json_digest(metrics)
    _atomic(metrics_path, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))


def load_metrics(path: str | os.PathLike) -> dict:
    """metrics.json, its own checksum checked (IntegrityError otherwise)."""
    fix = head_repair_command(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise integrity.IntegrityError(path, "missing", "the metrics file is gone", fix) from None
    try:
        metrics = json.loads(text)
        recorded = metrics.pop("content_sha256")
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise integrity.IntegrityError(
            path, "unreadable", f"not a metrics file with a checksum ({exc})", fix
        ) from None
    if integrity.json_digest(metrics) != recorded:
        raise integrity.IntegrityError(
            path, "checksum", "its content does not match its recorded sha256", fix
        )
    return metrics


def verify_run(metrics_path: str | os.PathLike) -> dict:
    """Check a run's metrics.json and its head.npz; returns the metrics."""
    metrics = load_metrics(metrics_path)
    head = Path(metrics_path).with_name(HEAD_NAME)
    from pipeline_lib.heads.released import load_head

    load_head(head, repair=head_repair_command(metrics_path))  # its own checksum
    got = integrity.digest_file(head)
    if got != metrics.get("head_sha256"):
        raise integrity.IntegrityError(
            head,
            "mismatch",
            f"it is intact but is not the head {metrics_path} was written with "
            "(e.g. copied from another run)",
            head_repair_command(metrics_path),
        )
    return metrics


def verify_runs(metrics_paths: Iterable[str | os.PathLike]) -> None:
    """`verify_run` on each; the first damaged run raises."""
    for p in metrics_paths:
        verify_run(p)
