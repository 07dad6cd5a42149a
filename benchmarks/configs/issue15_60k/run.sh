#!/bin/bash
# usage: BENCH=/path/to/bench run.sh NAME TARGET...   (one heavy process at a time, niced)
# Run from the repository root; config.yaml here names BENCH's results directory
# (results_dir, experiments_file): copy it into BENCH and edit those two paths first.
set -euo pipefail
name=$1; shift
bench=${BENCH:?set BENCH to the directory holding config.yaml and results/}
export PYTHONPATH=$PWD
echo "start $(date -u +%FT%TZ) $(uptime)" >> "$bench/$name.uptime"
rc=0
nice -n 19 .venv/bin/python -m snakemake "$@" --cores 2 --configfile "$bench/config.yaml" \
  --rerun-triggers mtime input > "$bench/$name.snake.log" 2>&1 || rc=$?
echo "rc=$rc end $(date -u +%FT%TZ) $(uptime)" >> "$bench/$name.uptime"
exit "$rc"
