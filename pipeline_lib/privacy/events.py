"""Every release's DpEvent, as a pure function of public parameters; and JSON.

One function per mechanism (the pattern of jax_privacy's ``accounting.py``):
the arguments are the public parameters of the release (noise multipliers,
sampling rate, number of steps) and the result is exactly the
``dp_accounting`` event that calibration and the ledger account. Each head's
``dp_event()`` is one call into this module, and nothing outside
``pipeline_lib.privacy`` builds an event. A noise multiplier is the noise
standard deviation divided by the L2 sensitivity of that release (the
sensitivities are stated in each head's docstring, next to the code that
enforces them).

JSON: every metrics file carries its exact release.

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

__all__ = [
    "centered_event",
    "dp_fc_event",
    "dp_ls_event",
    "dp_newton_event",
    "dp_sgd_event",
    "event_from_json",
    "event_to_json",
    "gaussian_event",
    "private_selection_event",
    "repeat_and_select_event",
]


def gaussian_event(noise_multiplier: float) -> dp_event.DpEvent:
    """One Gaussian release (std = multiplier x L2 sensitivity).

    >>> gaussian_event(2.5)
    GaussianDpEvent(noise_multiplier=2.5)
    """
    return dp_event.GaussianDpEvent(noise_multiplier)


def repeat_and_select_event(base: dp_event.DpEvent, mean: float, shape: float) -> dp_event.DpEvent:
    """Papernot & Steinke's repeat-and-select: K ~ D(mean, shape) runs of `base`, only the
    best released (shape inf: Poisson; 0: logarithmic; 1: geometric; else truncated
    negative binomial). RDP accountant only.

    >>> repeat_and_select_event(gaussian_event(3.0), 10.0, 1.0)
    RepeatAndSelectDpEvent(event=GaussianDpEvent(noise_multiplier=3.0), mean=10.0, shape=1.0)
    """
    return dp_event.RepeatAndSelectDpEvent(base, float(mean), float(shape))


# ----------------------------------------------------------------- events of the mechanisms


def dp_ls_event(noise_multiplier: float, xty_noise_ratio: float) -> dp_event.DpEvent:
    """DP-LS: X^T X with multiplier s and X^T Y with multiplier r s, each released once.

    >>> dp_ls_event(4.0, 0.5)
    ComposedDpEvent(events=[GaussianDpEvent(noise_multiplier=4.0), \
GaussianDpEvent(noise_multiplier=2.0)])
    """
    return dp_event.ComposedDpEvent(
        [
            dp_event.GaussianDpEvent(noise_multiplier),
            dp_event.GaussianDpEvent(xty_noise_ratio * noise_multiplier),
        ]
    )


def dp_newton_event(
    noise_multiplier: float, hessian_noise_ratio: float, num_steps: int
) -> dp_event.DpEvent:
    """DP-Newton: T steps, each a gradient (multiplier s) and a Hessian (r s) release.

    >>> dp_newton_event(8.0, 2.0, 3)
    SelfComposedDpEvent(event=ComposedDpEvent(events=[GaussianDpEvent(noise_multiplier=8.0), \
GaussianDpEvent(noise_multiplier=16.0)]), count=3)
    """
    step = dp_event.ComposedDpEvent(
        [
            dp_event.GaussianDpEvent(noise_multiplier),
            dp_event.GaussianDpEvent(hessian_noise_ratio * noise_multiplier),
        ]
    )
    return dp_event.SelfComposedDpEvent(step, int(num_steps))


def dp_fc_event(
    noise_multiplier: float,
    grad_noise_ratio: float,
    num_steps: int,
    sampling_prob: float | None = None,
) -> dp_event.DpEvent:
    """DP-FC: the covariance once (multiplier s), then T gradient steps (r s), each on a
    Poisson sample of rate q when `sampling_prob` is given (full batches otherwise).

    >>> dp_fc_event(2.0, 3.0, 10)
    ComposedDpEvent(events=[GaussianDpEvent(noise_multiplier=2.0), \
SelfComposedDpEvent(event=GaussianDpEvent(noise_multiplier=6.0), count=10)])
    >>> dp_fc_event(2.0, 3.0, 10, 0.25).events[1].event
    PoissonSampledDpEvent(sampling_probability=0.25, event=GaussianDpEvent(noise_multiplier=6.0))
    """
    grad: dp_event.DpEvent = dp_event.GaussianDpEvent(grad_noise_ratio * noise_multiplier)
    if sampling_prob is not None:
        grad = dp_event.PoissonSampledDpEvent(sampling_prob, grad)
    return dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(noise_multiplier), dp_event.SelfComposedDpEvent(grad, num_steps)]
    )


def dp_sgd_event(noise_multiplier: float, sampling_prob: float, num_steps: int) -> dp_event.DpEvent:
    """DP-SGD: T steps of a Poisson sample (rate q) with a Gaussian sum (multiplier s).

    >>> dp_sgd_event(1.1, 0.01, 500)
    SelfComposedDpEvent(event=PoissonSampledDpEvent(sampling_probability=0.01, \
event=GaussianDpEvent(noise_multiplier=1.1)), count=500)
    """
    step = dp_event.PoissonSampledDpEvent(sampling_prob, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SelfComposedDpEvent(step, int(num_steps))


def private_selection_event(
    candidate_events: list[dp_event.DpEvent], selection_noise_multiplier: float
) -> dp_event.DpEvent:
    """Private selection by composition: every candidate's training, then the G noisy
    validation counts (L2 sensitivity sqrt(G), multiplier z per unit of it).

    >>> private_selection_event([dp_event.GaussianDpEvent(5.0)], 3.0)
    ComposedDpEvent(events=[GaussianDpEvent(noise_multiplier=5.0), \
GaussianDpEvent(noise_multiplier=3.0)])
    """
    return dp_event.ComposedDpEvent(
        [*candidate_events, dp_event.GaussianDpEvent(selection_noise_multiplier)]
    )


def centered_event(
    center_noise_multiplier: float, head_event: dp_event.DpEvent
) -> dp_event.DpEvent:
    """Private centring: the noisy feature sum (multiplier s_m, sensitivity C), then the
    head on the rows centred by it (adaptive composition; see `privacy.centering`).

    >>> centered_event(20.0, gaussian_event(4.0))
    ComposedDpEvent(events=[GaussianDpEvent(noise_multiplier=20.0), \
GaussianDpEvent(noise_multiplier=4.0)])
    """
    return dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(center_noise_multiplier), head_event])


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
