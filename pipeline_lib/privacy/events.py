"""DpEvents to and from JSON, so every metrics file carries its exact release.

The privacy ledger composes the events of all releases from one dataset; it
reads them back from the metrics files with :func:`event_from_json` rather
than rebuilding them from hyperparameters, so the ledger accounts for exactly
what each run accounted for. Events are ``attrs`` classes of
``dp_accounting.dp_event``; the encoding is ``{"type": <class name>, <field>: ...}``
with nested events and lists of events encoded recursively.
"""

from __future__ import annotations

from typing import Any

import attr
from dp_accounting import dp_event

__all__ = ["event_from_json", "event_to_json"]


def _encode(value: Any) -> Any:
    if isinstance(value, dp_event.DpEvent):
        return event_to_json(value)
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise TypeError(f"cannot encode {type(value).__name__} value {value!r} in a DpEvent")


def event_to_json(event: dp_event.DpEvent) -> dict:
    """A JSON-serialisable dict that :func:`event_from_json` turns back into ``event``."""
    if not attr.has(type(event)):
        raise TypeError(f"{event!r} is not a dp_accounting event")
    fields = attr.asdict(event, recurse=False)
    return {"type": type(event).__name__, **{k: _encode(v) for k, v in fields.items()}}


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "type" in value:
        return event_from_json(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def event_from_json(data: dict) -> dp_event.DpEvent:
    """Inverse of :func:`event_to_json`; unknown types are an error."""
    name = data.get("type")
    cls = getattr(dp_event, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
        raise ValueError(f"unknown DpEvent type {name!r}")
    return cls(**{k: _decode(v) for k, v in data.items() if k != "type"})
