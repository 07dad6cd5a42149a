"""Private feature centring: a noisy, accounted feature mean, and the rows centred by it.

Why. Backbone features such as EfficientNet-Lite's are post-activation and all
positive, so one direction (the mean) dominates every row; least-squares and
logistic heads without an intercept spend their noisy statistics on it.
Centring by the training mean removes it.

The release (add-or-remove-one neighbouring relation):

* ``center/sum``: S = sum_i b(x_i) + E, where b = `bound_rows(., C, transform)`
  is the head's own feature bound, so every ||b(x_i)|| <= C, and E has iid
  N(0, (s_m C)^2) coordinates, drawn with the key (key.child("center"),
  "center/sum"): a child of the run's (or candidate's) key, so it is
  independent of every other draw of the run. Sensitivity: adding or removing
  one example changes S by b(x), of L2 norm <= C. Noise multiplier s_m.
* mu~ = S / N. N is public (the project's privacy statement declares the
  training-set size public), so the division is post-processing.

The rows. Every later use of a feature vector x (training, validation, test,
classification of new images) maps it to

    bound_rows(b(x) - mu~, C, transform)

(`center_rows` gives b(x) - mu~; the head then applies its usual
`bound_rows`). The mean is taken of b(x), not of the raw x, because that is
the quantity with a known bound C: the raw features have no public scale.
Why every later release keeps its own sensitivity analysis unchanged: mu~ is a
released, public quantity, and given mu~ the map x -> b(x) - mu~ is a fixed
per-example map, so one example still changes only its own row, and the
head's `bound_rows` makes that row's norm <= C whatever mu~ is (a property
test checks it for random mu~). The head is thus a mechanism run after, and
with knowledge of, the mean release: adaptive composition, which
dp_accounting's ``ComposedDpEvent`` accounts exactly like the
non-adaptive one (`events.centered_event`).

Calibration (`calibrate_centered`). The mean gets a fixed share ``c`` of the
Gaussian-DP budget: s_m = z / sqrt(c), z = the single-Gaussian multiplier
that spends all of (epsilon, delta) (mu_m^2 = c mu^2; Gaussian mu^2 add).
Then the head's calibrated noise is scaled by the smallest common factor t
whose composition [Gaussian(s_m), head(t)] spends at most (epsilon, delta),
by the same bracket-and-bisect search as every run (`accounting.calibrate_noise_scale`,
the style of `selection.calibrate_jointly`). For Gaussian heads (DP-LS, DP-Newton,
full-batch DP-FC) t = 1 / sqrt(1 - c) exactly, so the head keeps the share 1 - c;
for Poisson-sampled heads the same search finds t with the PLD/RDP accountant.

The default share ``DEFAULT_SHARE = 0.02`` is a constant fixed in advance (a
formula of nothing private), chosen from public quantities, not from accuracy:
the expected norm of mu~'s error is s_m sqrt(d) C / N; at the project's default
data (N = 60000, d = 1280, delta = 1e-5) it is <= 0.016 C for every epsilon >= 1
(z(1, 1e-5) = 3.73), a small fraction of the norm C of a row, while the head
loses only 1 - sqrt(0.98) = 1% of its noise scale.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from pipeline_lib.privacy import accounting, events, noise
from pipeline_lib.privacy.clipping import bound_rows, check_bound
from pipeline_lib.privacy.selection import with_noise

__all__ = [
    "CENTER_KEY_LABEL",
    "CENTER_RELEASE",
    "DEFAULT_SHARE",
    "CenteredCalibration",
    "bounded_sum",
    "calibrate_centered",
    "center_noise_multiplier",
    "center_rows",
    "release_mean",
]

CENTER_RELEASE = "center/sum"
CENTER_KEY_LABEL = "center"  # the mean's key is key.child(CENTER_KEY_LABEL)
DEFAULT_SHARE = 0.02


def check_share(share: float) -> float:
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
        raise ValueError(f"center_share must be a number in (0, 1), got {share!r}")
    return float(share)


def center_noise_multiplier(*, epsilon: float, delta: float, share: float) -> float:
    """s_m = z(epsilon, delta) / sqrt(share): the mean gets `share` of the Gaussian mu^2."""
    return dp_accounting.get_sigma_gaussian(epsilon, delta) / math.sqrt(check_share(share))


@partial(jax.jit, static_argnames=("transform",))  # C is traced: one program for every C
def _bounded_chunk_sum(x, *, l2_clip_norm, transform):
    return jnp.sum(bound_rows(x, l2_clip_norm, transform), axis=0)


def bounded_sum(data, *, l2_clip_norm: float, transform: str) -> np.ndarray:
    """sum_i bound_rows(x_i) over `data` (one streamed pass; NOT private, never released)."""
    total = np.zeros(int(data.feature_dim), np.float64)
    seen = 0
    for feats, labels in data.iter_chunks():
        x = jnp.asarray(feats, jnp.float32)
        part = _bounded_chunk_sum(
            x, l2_clip_norm=check_bound("l2_clip_norm", l2_clip_norm), transform=transform
        )
        total += np.asarray(part, np.float64)
        seen += len(labels)
    if seen != data.num_examples:  # one pass, each example once
        raise AssertionError(f"centring pass saw {seen} examples, data has {data.num_examples}")
    return total


def release_mean(
    data,
    *,
    l2_clip_norm: float,
    transform: str,
    noise_multiplier: float,
    key: noise.NoiseKey,
) -> np.ndarray:
    """mu~ = (sum_i bound_rows(x_i) + N(0, (s_m C)^2 I)) / N, float32 (d,).

    Noise from ``key.child("center")`` (its own key); N = data.num_examples is public.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"center noise_multiplier must be > 0, got {noise_multiplier!r}")
    n = int(data.num_examples)
    if n <= 0:
        raise ValueError("cannot release the mean of an empty training set")
    total = bounded_sum(data, l2_clip_norm=l2_clip_norm, transform=transform)
    std = float(noise_multiplier) * float(l2_clip_norm)
    draw = noise.gaussian(
        noise.require_key(key).child(CENTER_KEY_LABEL), CENTER_RELEASE, total.shape, std
    )
    return ((total + np.asarray(draw, np.float64)) / n).astype(np.float32)


@partial(jax.jit, static_argnames=("transform",))  # C is traced
def _center(x, center, *, l2_clip_norm, transform):
    return bound_rows(x, l2_clip_norm, transform) - center


def center_rows(x, center, *, l2_clip_norm: float, transform: str) -> np.ndarray:
    """bound_rows(x) - mu~ per row, float32. A public per-example map given the released
    mu~; the head applies its own bound_rows to the result."""
    x = np.asarray(x, np.float32)
    center = np.asarray(center, np.float32)
    if x.ndim != 2 or center.shape != (x.shape[1],):
        raise ValueError(f"features {x.shape} and feature center {center.shape} do not match")
    out = _center(
        x, center, l2_clip_norm=check_bound("l2_clip_norm", l2_clip_norm), transform=transform
    )
    return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class CenteredCalibration:
    head: object  # the head with its noise scaled by `factor`
    center_noise_multiplier: float  # s_m
    factor: float  # t
    event: dp_accounting.DpEvent  # ComposedDpEvent([Gaussian(s_m), head event])
    spent_epsilon: float


def calibrate_centered(
    head, *, epsilon: float, delta: float, num_examples: int | None, share: float
) -> CenteredCalibration:
    """Calibrate the mean release and `head` together to spend <= (epsilon, delta).

    The mean's multiplier is fixed (share `share` of the Gaussian mu^2); the head's
    calibrated multipliers are scaled by the smallest common factor t that makes the
    composition fit (see the module docstring).
    """
    s_m = center_noise_multiplier(epsilon=epsilon, delta=delta, share=share)
    alone = head.calibrate(epsilon=epsilon, delta=delta, num_examples=num_examples)
    base = alone.noise_multiplier

    def make_event(t: float) -> dp_accounting.DpEvent:
        return events.centered_event(s_m, with_noise(alone, t * base).dp_event())

    cal = accounting.calibrate_noise_scale(
        make_event,
        target_epsilon=epsilon,
        target_delta=delta,
        accountant=alone.accountant,
        initial_guess=1.0 / math.sqrt(1.0 - share),  # exact for Gaussian heads
        num_examples=num_examples,
    )
    t = cal.noise_scale
    event = make_event(t)
    return CenteredCalibration(
        head=with_noise(alone, t * base),
        center_noise_multiplier=s_m,
        factor=t,
        event=event,
        spent_epsilon=accounting.spend(
            event, target_epsilon=epsilon, delta=delta, accountant=alone.accountant
        ),
    )
