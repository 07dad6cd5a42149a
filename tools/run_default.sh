#!/usr/bin/env bash
# Set up (idempotent) and run the whole workflow on config/experiments.yaml.
# Extra arguments go to snakemake, e.g. `bash tools/run_default.sh -n` for a dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/snakemake --cores all "$@"
