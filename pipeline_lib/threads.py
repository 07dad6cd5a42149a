"""How many threads numpy's BLAS/LAPACK may use in processes that run several jobs at once.

The workflow's warm process runs several `run:` jobs (head fits, statistics) at the same time
in its threads, and the test suite runs one pytest worker more than there are cores. In both,
numpy's OpenBLAS would give every eigh/solve call a pool of one thread per core, and the pools
of concurrent calls, plus XLA's own threads, then spin against each other: on the 2-core
development machine a DP-Newton fit of the tiny workflow took 98.5 s with two BLAS threads
under load and 10.8 s with one (8.5 s with two on an idle machine). One BLAS thread per job
costs at most the second core on the eigendecompositions when a job runs alone; the heavy
products run in XLA, which this does not touch.
"""

from __future__ import annotations

import os

ENV = "OPENBLAS_NUM_THREADS"


def limit_blas_threads(num_threads: int = 1) -> None:
    """Cap numpy's BLAS/LAPACK at `num_threads` threads in this process (threadpoolctl, which
    works after numpy is loaded) and in the processes it starts (the environment variables
    that OpenBLAS, MKL and OpenMP read when they load)."""
    from threadpoolctl import threadpool_limits

    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    for name in (ENV, "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = str(num_threads)
    threadpool_limits(limits=num_threads, user_api="blas")
