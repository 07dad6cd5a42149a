"""Private hyperparameter selection: mechanisms and their accounting.

Private selection (``selection: private``) over G candidate configurations of
one head, for a target (epsilon, delta) that covers the whole procedure:

1. The training split is cut into a *fit* part and a *validation* part by a
   per-example hash (``pipeline_lib.features.split``): adding or removing one
   example changes one part by one example and moves nobody else.
2. Every candidate is trained with DP on the fit part. Candidate g's noise is
   ``t * s_g``, where ``s_g`` is the noise that would give candidate g the whole
   (epsilon, delta) on its own; one common factor ``t`` is calibrated below.
3. The G validation scores (numbers of correct predictions) are released with
   Gaussian noise: one example of the validation part changes each count by at
   most 1, so the vector's L2 sensitivity is sqrt(G), and the noise std is
   ``t * z * sqrt(G)`` with ``z`` the single-Gaussian multiplier for (epsilon, delta).
   The candidate with the highest noisy score is selected (post-processing).
4. The whole release is ``ComposedDpEvent([candidate events..., Gaussian(t z)])``:
   all G trainings and the selection compose, which is conservative (a private
   example sits in only one of the two parts). ``t`` is the smallest factor whose
   composed event spends at most the target, by the same dp_accounting calibration
   as every single run.

The reported epsilon of a tuned run is that total; each candidate's own
epsilon (what it would cost alone) is reported next to it.

Public selection (``selection: public``) trains the candidates with DP at the
same (epsilon, delta) on a dataset the config declares public, compares them
on its test split, and then trains only the winner on the private data: the
private data pays for one run, so the run's epsilon covers tuning.
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np

from pipeline_lib.privacy import accounting, events, noise

__all__ = ["JointCalibration", "calibrate_jointly", "noisy_selection", "with_noise"]


def with_noise(head, noise_multiplier: float):
    """A calibrated head with its noise scale replaced (everything else kept)."""
    return dataclasses.replace(head, noise_multiplier=float(noise_multiplier))


@dataclasses.dataclass(frozen=True)
class JointCalibration:
    heads: list  # calibrated candidates, noise t * s_g
    selection_noise_multiplier: float  # t * z, per unit of L2 sensitivity sqrt(G)
    factor: float  # t
    event: dp_accounting.DpEvent
    spent_epsilon: float  # of the whole composed event, at delta
    candidate_epsilons: list[float]  # each candidate alone, at delta


def _joint_event(alone: list, z: float, t: float) -> dp_accounting.DpEvent:
    trained = [with_noise(h, t * h.noise_multiplier).dp_event() for h in alone]
    return events.private_selection_event(trained, t * z)


def calibrate_jointly(
    heads: list, *, epsilon: float, delta: float, accountant: str, num_examples: int
) -> JointCalibration:
    """Calibrate G candidates and the selection so that all of it spends <= (epsilon, delta)."""
    if not heads:
        raise ValueError("no candidates to calibrate")
    alone = [h.calibrate(epsilon=epsilon, delta=delta, num_examples=num_examples) for h in heads]
    z = dp_accounting.get_sigma_gaussian(epsilon, delta)
    g = len(alone) + 1
    cal = accounting.calibrate_noise_scale(
        lambda t: _joint_event(alone, z, t),
        target_epsilon=epsilon,
        target_delta=delta,
        accountant=accountant,
        initial_guess=math.sqrt(g),  # exact for Gaussian-only heads (mu adds in quadrature)
        num_examples=num_examples,
    )
    t = cal.noise_scale
    final = [with_noise(h, t * h.noise_multiplier) for h in alone]
    event = _joint_event(alone, z, t)
    return JointCalibration(
        heads=final,
        selection_noise_multiplier=t * z,
        factor=t,
        event=event,
        spent_epsilon=accounting.spend(
            event, target_epsilon=epsilon, delta=delta, accountant=accountant
        ),
        candidate_epsilons=[accounting.epsilon_of(h.dp_event(), delta, accountant) for h in final],
    )


def noisy_selection(
    correct: list[int], *, noise_multiplier: float, key: noise.NoiseKey
) -> tuple[int, np.ndarray]:
    """(argmax index, noisy counts): Gaussian noise of std noise_multiplier * sqrt(G).

    Only the noisy counts and the argmax are released; the exact counts never leave.
    """
    counts = np.asarray(correct, np.float64)
    std = noise_multiplier * math.sqrt(len(counts))
    draw = noise.gaussian(key, "tuning/validation_scores", (len(counts),), std)
    noisy = counts + np.asarray(draw, np.float64)
    return int(np.argmax(noisy)), noisy
