"""The attacker who holds every published file cannot regenerate the noise.

A membership audit (`audit.regeneration_audit`) lets the attacker rebuild the
noise key from a run's published metadata (its identity and its ``noise``
record, exactly as metrics.json has them) and compare the release with the
two candidate re-fits. With the secret key it stays below the claimed epsilon;
the same audit flags the reproducible mode, which proves it has the power to.
"""

import numpy as np
import pytest

from pipeline_lib import runner
from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.heads.dp_ls import DPLeastSquares
from pipeline_lib.heads.dp_sgd import DPSGDLogistic
from pipeline_lib.heads.stats import compute_stats
from pipeline_lib.privacy import noise
from pipeline_lib.privacy.audit import regeneration_audit

EPS, DELTA, TRIALS = 1.0, 1e-5, 100
SECRET = {"mode": "secret"}
REPRO = {"mode": "reproducible", "seed": 0}


def _data(n=200, d=4, k=2):
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n).astype(np.int32)
    x = (rng.normal(size=(n, d)) + 2.0 * np.eye(k, d)[y]).astype(np.float32)
    canary = np.zeros((1, d), np.float32)
    canary[0, -1] = 5.0  # far from the data, in a direction no example uses
    without = InMemoryFeatures(x, y, num_classes=k, chunk_rows=64)
    with_ = InMemoryFeatures(
        np.concatenate([x, canary]), np.append(y, 1).astype(np.int32), num_classes=k, chunk_rows=64
    )
    return without, with_


def _spec(method: str, trial: int, noise_cfg: dict) -> dict:
    return dict(
        experiment="audit",
        dataset="d",
        backbone="b",
        image_size=32,
        method=method,
        budget="eps1",
        seed=trial,
        noise=noise_cfg,
    )


def _attacker_key(meta: dict) -> noise.NoiseKey:
    """The attacker's best key from the published metadata: the run's identity plus its
    noise record. A secret-mode record has no seed to use, so the attacker guesses 0."""
    ident = runner.run_identity(meta)
    published = meta["noise"]
    cfg = published if published["mode"] == "reproducible" else REPRO
    return noise.key_for_run(cfg, ident)


def _audit(method, fit_without, fit_with, noise_cfg):
    def release(include_canary, trial):
        spec = _spec(method, trial, noise_cfg)
        key = runner.noise_key(spec)  # exactly what run_head uses
        out = (fit_with if include_canary else fit_without)(key)
        meta = {k: spec[k] for k in ("experiment", "dataset", "backbone", "image_size")}
        meta.update(method=method, budget="eps1", seed=trial, noise=runner.noise_record(spec))
        return out, meta

    def regenerate(include_canary, meta):
        return (fit_with if include_canary else fit_without)(_attacker_key(meta))

    return regeneration_audit(release, regenerate, trials=TRIALS, delta=DELTA)


def _check(secret, repro):
    assert repro.max_detectable_epsilon > EPS  # the audit could flag a claimed epsilon of 1
    assert repro.epsilon_lower_bound > EPS, "reproducible noise must be flagged"
    assert secret.epsilon_lower_bound < EPS, f"secret noise audited at {secret}"


def test_dp_ls_noise_cannot_be_regenerated_from_published_metadata():
    without, with_ = _data()
    head = DPLeastSquares().calibrate(epsilon=EPS, delta=DELTA)
    s0 = compute_stats(without, l2_clip_norm=head.l2_clip_norm, transform=head.feature_transform)
    s1 = compute_stats(with_, l2_clip_norm=head.l2_clip_norm, transform=head.feature_transform)
    fits = (
        lambda key: head.fit(s0, key=key)["weights"],
        lambda key: head.fit(s1, key=key)["weights"],
    )
    _check(_audit("dp_ls", *fits, SECRET), _audit("dp_ls", *fits, REPRO))


@pytest.mark.slow
def test_dp_sgd_noise_and_sampling_cannot_be_regenerated_from_published_metadata():
    without, with_ = _data()
    kw = dict(batch_size=64, epochs=1, learning_rate=1.0)
    h0 = DPSGDLogistic(**kw).calibrate(epsilon=EPS, delta=DELTA, num_examples=without.num_examples)
    h1 = DPSGDLogistic(**kw).calibrate(epsilon=EPS, delta=DELTA, num_examples=with_.num_examples)
    fits = (
        lambda key: h0.fit(without, key=key)["weights"],
        lambda key: h1.fit(with_, key=key)["weights"],
    )
    _check(_audit("dp_sgd", *fits, SECRET), _audit("dp_sgd", *fits, REPRO))
