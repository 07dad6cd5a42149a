"""Mock TFDS in every Python process of a test run, when DP_TEST_MOCK_TFDS is set.

Python imports ``sitecustomize`` at start-up from the first folder on sys.path
that has one. A test that puts this folder on PYTHONPATH and sets
``DP_TEST_MOCK_TFDS=<n>`` makes every interpreter it starts (Snakemake, and
the scripts Snakemake runs in subprocesses) enter
``tfds.testing.mock_data(num_examples=n)`` for its whole life, so
``tfds.data_source`` returns n random examples per split of any TFDS dataset,
with no prepared files and no TensorFlow.

The mock data is deterministic: record i of a dataset is drawn from
``numpy.random.default_rng(i)`` (TFDS's RandomFakeGenerator, seed 0 plus the
index), so separate processes, such as shard jobs, read the same images. The
mock ignores the split name, so train and test hold the same records.

Without the variable (or with it empty) this file does nothing.
"""

import os

_VARIABLE = "DP_TEST_MOCK_TFDS"
_value = os.environ.get(_VARIABLE, "").strip()

if _value:
    try:
        _num_examples = int(_value)
    except ValueError:
        _num_examples = 0
    if _num_examples < 1:
        # SystemExit is not swallowed by site.py, unlike other exceptions here.
        raise SystemExit(
            f"{__file__}: {_VARIABLE}={_value!r} must be a positive number of examples per split"
        )
    import tensorflow_datasets as _tfds

    _MOCK = _tfds.testing.mock_data(num_examples=_num_examples)
    _MOCK.__enter__()  # never exited: the whole interpreter sees mocked TFDS
