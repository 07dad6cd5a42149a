"""What every head shares: the checks of its fields, its public hyperparameters and the
N check.

`check_fields` is the one validator of head fields (the hyperparameters an experiments
file gives, and the calibrated noise multiplier): each head's ``__post_init__`` passes it
a table of field -> `Rule`, and every error reads ``"<head>: <field> <rule>, got <value>"``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any

from pipeline_lib.privacy.accounting import ACCOUNTANTS
from pipeline_lib.privacy.clipping import FEATURE_TRANSFORMS

__all__ = [
    "ACCOUNTANT",
    "BOOLEAN",
    "FEATURE_BOUND",
    "NONNEGATIVE",
    "NOISE_MULTIPLIER",
    "POSITIVE",
    "POSITIVE_INT",
    "PrivateHead",
    "Rule",
    "check_calibrated_num_examples",
    "check_fields",
    "in_interval",
    "one_of",
    "optional",
]


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value must be: a test, and the words for it ("must be > 0")."""

    ok: Callable[[Any], bool]
    text: str


def _number(v: Any) -> bool:  # numpy scalars included (calibrate may compute them)
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


POSITIVE = Rule(lambda v: _number(v) and v > 0, "must be > 0")
NONNEGATIVE = Rule(lambda v: _number(v) and v >= 0, "must be >= 0")
POSITIVE_INT = Rule(lambda v: _integer(v) and v >= 1, "must be an integer >= 1")
BOOLEAN = Rule(lambda v: isinstance(v, bool), "must be true or false")


def one_of(options: Collection) -> Rule:
    return Rule(lambda v: v in options, f"must be one of {tuple(options)}")


def in_interval(low: float, high: float, *, closed_low: bool, closed_high: bool) -> Rule:
    """A number in an interval, e.g. ``in_interval(0, 1, closed_low=False, closed_high=True)``
    for (0, 1]."""

    def ok(v: Any) -> bool:
        if not _number(v):
            return False
        above = v >= low if closed_low else v > low
        below = v <= high if closed_high else v < high
        return above and below

    brackets = ("[" if closed_low else "(", "]" if closed_high else ")")
    return Rule(ok, f"must be in {brackets[0]}{low:g}, {high:g}{brackets[1]}")


def optional(rule: Rule, meaning: str = "") -> Rule:
    """``rule``, or null (``meaning`` says what null stands for, e.g. "full batch")."""
    text = f"{rule.text} or null" + (f" ({meaning})" if meaning else "")
    return Rule(lambda v: v is None or rule.ok(v), text)


# Every head's feature bound; every private head's accountant and calibrated multiplier.
FEATURE_BOUND = {"l2_clip_norm": POSITIVE, "feature_transform": one_of(FEATURE_TRANSFORMS)}
ACCOUNTANT = {"accountant": one_of(ACCOUNTANTS)}
NOISE_MULTIPLIER = {"noise_multiplier": optional(POSITIVE, "not calibrated yet")}


def check_fields(name: str, head: Any, rules: Mapping[str, Rule]) -> None:
    """Check each field of ``head`` named in ``rules``; the ValueError names the head, the
    field, the rule and the value. The one validator of head fields (make_head turns its
    error into one that also names the experiment)."""
    for field, rule in rules.items():
        value = getattr(head, field)
        if not rule.ok(value):
            raise ValueError(f"{name}: {field} {rule.text}, got {value!r}")


class PrivateHead:
    """Mixin for the private heads (frozen dataclasses).

    ``CALIBRATION_FIELDS`` are set by ``calibrate`` (noise multipliers, and N for
    heads whose sampling rate depends on it); every other field is a public
    hyperparameter taken from the config.
    """

    private = True
    CALIBRATION_FIELDS: tuple[str, ...] = ("noise_multiplier",)

    def hyperparameters(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self.CALIBRATION_FIELDS
        }


def check_calibrated_num_examples(name: str, calibrated: int | None, actual: int) -> None:
    """Refuse data whose size differs from the N the noise was calibrated for."""
    if calibrated != actual:
        raise ValueError(
            f"{name}: calibrated for num_examples={calibrated}, but the data has "
            f"{actual}; calibrate again with num_examples={actual}"
        )
