#!/usr/bin/env bash
# Set up (idempotent), then lint and run the whole test suite (includes a tiny end-to-end
# snakemake run and `snakemake --lint`). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/ruff check pipeline_lib tests workflow/scripts benchmarks tools
exec .venv/bin/python -m pytest "$@"
