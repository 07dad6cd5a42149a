#!/usr/bin/env bash
# Set up (idempotent), then lint and run the whole test suite (includes a tiny end-to-end
# snakemake run, `snakemake --lint` and the live SLURM test). Extra arguments go to pytest.
# The tests run in parallel on every core (pytest-xdist, --dist loadgroup: tests that share
# an expensive fixture stay on one worker, see tests/conftest.py). One worker more than there
# are cores: the live SLURM test's worker spends most of its minutes waiting on the cluster's
# status polls, and the extra worker keeps the cores busy meanwhile. PYTEST_WORKERS=N sets
# the number of workers, PYTEST_WORKERS=0 runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/ruff check pipeline_lib tests workflow/scripts benchmarks tools
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-$(($(nproc) + 1))}" --dist loadgroup "$@"
