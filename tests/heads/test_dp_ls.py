import numpy as np
import pytest

from pipeline_lib.heads import make_head
from pipeline_lib.heads.dp_ls import DPLeastSquares
from pipeline_lib.heads.linear import solve_ridge_psd
from pipeline_lib.heads.nonprivate import NonPrivateRidge
from pipeline_lib.heads.stats import SuffStats
from pipeline_lib.privacy.noise import NoiseKey

rk = NoiseKey.reproducible  # test keys: reproducible, NOT private


def _stats(n=500, d=6, k=3, seed=0, transform="normalize"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centers = rng.normal(size=(k, d))
    x = centers[y] + 0.3 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    onehot = np.eye(k)[y]
    return (
        SuffStats(
            xtx=x.T @ x,
            xty=x.T @ onehot,
            class_counts=np.bincount(y, minlength=k),
            num_examples=n,
            l2_clip_norm=1.0,
            transform=transform,
        ),
        x,
        y,
    )


def test_vanishing_noise_equals_nonprivate_ridge():
    stats, _, _ = _stats()
    head = DPLeastSquares(ridge_lambda=1.0, noise_multiplier=1e-9)  # epsilon ~ 1e9
    private = head.fit(stats, key=rk(0))["weights"]
    exact = NonPrivateRidge(ridge_lambda=1.0).fit(stats)["weights"]
    np.testing.assert_allclose(private, exact, atol=1e-6)


def test_converges_to_nonprivate_ridge_as_epsilon_grows():
    stats, _, _ = _stats()
    exact = NonPrivateRidge(ridge_lambda=1.0).fit(stats)["weights"]
    errors = []
    for eps in (0.5, 4.0, 20.0):
        head = DPLeastSquares(ridge_lambda=1.0).calibrate(epsilon=eps, delta=1e-5)
        errs = [np.linalg.norm(head.fit(stats, key=rk(s))["weights"] - exact) for s in range(3)]
        errors.append(np.median(errs))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.2 * np.linalg.norm(exact)


def test_solve_matches_closed_form():
    stats, _, _ = _stats()
    w = solve_ridge_psd(stats.xtx, stats.xty, 0.5)
    expected = np.linalg.solve(stats.xtx + 0.5 * np.eye(6), stats.xty)
    np.testing.assert_allclose(w, expected, rtol=1e-8)


def test_psd_projection_handles_indefinite_gram():
    g = np.diag([1.0, -50.0, 2.0])
    w = solve_ridge_psd(g, np.ones((3, 1)), 0.1)
    np.testing.assert_allclose(w[:, 0], [1 / 1.1, 1 / 0.1, 1 / 2.1])


def test_release_noise_has_the_stated_scale_and_is_independent():
    d, k, c = 60, 10, 2.0
    zero = SuffStats(
        xtx=np.zeros((d, d)),
        xty=np.zeros((d, k)),
        class_counts=np.zeros(k),
        num_examples=1000,
        l2_clip_norm=c,
        transform="clip",
    )
    head = DPLeastSquares(l2_clip_norm=c, feature_transform="clip").calibrate(
        epsilon=1.0, delta=1e-5
    )
    s = head.noise_multiplier
    noisy = head.release(zero, key=rk(3))
    e = noisy.xtx
    np.testing.assert_array_equal(e, e.T)
    off = e[~np.eye(d, dtype=bool)]
    # diagonal: stddev s C^2; symmetrised off-diagonal: s C^2 / sqrt(2)
    assert np.std(np.diag(e)) == pytest.approx(s * c**2, rel=0.3)
    assert np.std(off) == pytest.approx(s * c**2 / np.sqrt(2), rel=0.05)
    f = noisy.xty
    assert np.std(f) == pytest.approx(s * c, rel=0.1)
    corr = np.corrcoef(f.T)
    assert np.max(np.abs(corr[~np.eye(k, dtype=bool)])) < 0.5  # shared noise would be 1.0
    assert len({tuple(np.round(col, 8)) for col in f.T}) == k
    # another seed, other noise
    assert not np.allclose(head.release(zero, key=rk(4)).xty, f)


def test_stats_config_mismatch_is_an_error():
    stats, _, _ = _stats(transform="clip")
    head = DPLeastSquares().calibrate(epsilon=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="statistics were computed with"):
        head.fit(stats, key=rk(0))


def test_noise_lowers_accuracy_monotonically_on_average():
    stats, x, y = _stats(n=2000, d=20, k=4)
    accs = []
    # epsilon 10 already fits perfectly here; calibrating epsilon 1000 took the PLD ~30 s
    for eps in (0.05, 10.0):
        head = DPLeastSquares().calibrate(epsilon=eps, delta=1e-5)
        a = [
            np.mean(np.argmax(x @ head.fit(stats, key=rk(s))["weights"], 1) == y) for s in range(3)
        ]
        accs.append(np.median(a))
    assert accs[1] > 0.95 and accs[0] < accs[1]


@pytest.mark.parametrize(
    "params,match",
    [
        ({"l2_clip_norm": 0}, "l2_clip_norm must be > 0"),
        ({"feature_transform": "zca"}, r"feature_transform must be one of .*, got 'zca'"),
        ({"clip": 1.0}, r"unknown hyperparameter\(s\) \['clip'\]"),
        ({"accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        make_head("dp_ls", params, where="experiment 'x'")
