"""What every private head shares: its public hyperparameters and the N check."""

from __future__ import annotations

import dataclasses

__all__ = ["PrivateHead", "check_calibrated_num_examples"]


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
