"""The BLAS thread cap of processes that run several jobs at once (pipeline_lib/threads.py)."""

import os
import subprocess
import sys

import pytest

from pipeline_lib.threads import limit_blas_threads


def test_cap_applies_here_and_to_child_processes():
    script = (
        "import numpy, threadpoolctl\n"
        "from pipeline_lib.threads import limit_blas_threads\n"
        "limit_blas_threads(1)\n"
        "pools = [p for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas']\n"
        "assert pools and all(p['num_threads'] == 1 for p in pools), pools\n"
        "import os, subprocess, sys\n"
        "print(subprocess.run([sys.executable, '-c', 'import os; "
        'print(os.environ["OPENBLAS_NUM_THREADS"])\'], capture_output=True, text=True).stdout)\n'
    )
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "1"


def test_the_suite_runs_with_one_blas_thread():
    """tests/conftest.py caps every worker, as the Snakefile caps the workflow's process."""
    import threadpoolctl

    pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert pools and all(p["num_threads"] == 1 for p in pools)
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_bad_count_is_refused():
    with pytest.raises(ValueError, match="num_threads"):
        limit_blas_threads(0)
