import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.features.memory import InMemoryFeatures
from pipeline_lib.features.split import RowSubset, holdout_mask


def _data(n=1000, d=5, k=3, chunk_rows=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, n).astype(np.int32)
    return InMemoryFeatures(x, y, num_classes=k, chunk_rows=chunk_rows), x, y


def test_mask_is_deterministic_and_about_the_right_size():
    _, x, _ = _data(n=20000)
    m = holdout_mask(x, 0.1)
    assert np.array_equal(m, holdout_mask(x.copy(), 0.1))
    assert abs(m.mean() - 0.1) < 0.01  # 20000 Bernoulli(0.1): sd 0.002
    assert np.all(holdout_mask(x, 0.2)[m])  # nested: a larger fraction keeps every member


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 299), st.integers(0, 2**31 - 1))
def test_removing_one_example_moves_nobody_else(removed, seed):
    """The property the add/remove accounting of private selection relies on."""
    _, x, _ = _data(n=300, seed=seed % 1000)
    full = holdout_mask(x, 0.3)
    without = holdout_mask(np.delete(x, removed, axis=0), 0.3)
    assert np.array_equal(np.delete(full, removed), without)


def test_subset_reads_exactly_its_rows_in_order_with_full_chunks():
    data, x, y = _data(n=1000, chunk_rows=64)
    m = holdout_mask(x, 0.25)
    for part, keep in (("validation", m), ("fit", ~m)):
        sub = RowSubset(data, part=part, fraction=0.25)
        assert sub.num_examples == keep.sum()
        assert sub.chunk_rows == 64 and all(s == 64 for s in sub.chunk_sizes()[:-1])
        xs, ys = sub.read_all()
        np.testing.assert_array_equal(xs, x[keep])
        np.testing.assert_array_equal(ys, y[keep])
        assert sum(len(c[1]) for c in sub.iter_chunks()) == sub.num_examples
    fit = RowSubset(data, part="fit", fraction=0.25)
    val = RowSubset(data, part="validation", fraction=0.25)
    assert fit.num_examples + val.num_examples == 1000
    fit2, val2 = RowSubset.split(data, fraction=0.25)  # one pass for both parts
    np.testing.assert_array_equal(fit2.rows, fit.rows)
    np.testing.assert_array_equal(val2.rows, val.rows)


def test_bad_arguments():
    data, _, _ = _data(n=10)
    with pytest.raises(ValueError, match="part must be one of"):
        RowSubset(data, part="train", fraction=0.1)
    with pytest.raises(ValueError, match=r"validation fraction must be in \(0, 1\)"):
        RowSubset(data, part="fit", fraction=1.5)
    with pytest.raises(ValueError, match="is empty"):
        RowSubset(_data(n=1)[0], part="validation", fraction=1e-9)
