#!/bin/bash
# usage: run.sh NAME TARGET...   (one heavy process at a time, niced)
name=$1; shift
cd /work/wt15 && export PYTHONPATH=/work/wt15
{ echo "start $(date -u +%FT%TZ) $(uptime)"; } >> /work/bench15g/$name.uptime
nice -n 19 /usr/bin/time -v /work/main/.venv/bin/python -m snakemake "$@" --cores 2 --configfile /work/bench15g/config.yaml --rerun-triggers mtime input > /work/bench15g/$name.snake.log 2>&1
echo "rc=$? end $(date -u +%FT%TZ) $(uptime)" >> /work/bench15g/$name.uptime
