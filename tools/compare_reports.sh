#!/usr/bin/env bash
# No-behaviour-change check: run the tiny workflow (tests/workflow) in reproducible noise
# mode from two checkouts and diff their results/reports/ recursively.
#   tools/compare_reports.sh /work/wt13base /work/wt13c /tmp/cmp13
# Wall-time columns differ between any two runs; everything else should be byte-identical.
set -euo pipefail
BASE=$(realpath "$1"); NEW=$(realpath "$2"); OUT=${3:-/tmp/compare_reports}
PY=${PYTHON:-/work/main/.venv/bin/python}
HERE=$(dirname "$(realpath "$0")")/../tests/workflow
run() {  # run CHECKOUT WORKDIR
    local src=$1 work=$2
    mkdir -p "$work"
    cp "$HERE/config.yaml" "$work/config.yaml"
    "$PY" - "$HERE/experiments.yaml" "$work/experiments.yaml" <<'PY'
import sys, yaml
exps = yaml.safe_load(open(sys.argv[1]))
for e in exps["experiments"].values():
    e["noise"] = {"mode": "reproducible", "seed": 0}
yaml.safe_dump(exps, open(sys.argv[2], "w"))
PY
    (cd "$src" && PYTHONPATH="$src" nice -n 10 "$PY" -m snakemake -s "$src/Snakefile" \
        --directory "$work" --configfile "$work/config.yaml" --cores 2 >"$work/snakemake.out" 2>&1)
}
if [[ "${SKIP_BASE:-0}" != 1 ]]; then run "$BASE" "$OUT/base"; fi
if [[ "${ONLY_BASE:-0}" == 1 ]]; then exit 0; fi
run "$NEW" "$OUT/new"
diff -r "$OUT/base/results/reports" "$OUT/new/results/reports" && echo "reports: byte-identical"
