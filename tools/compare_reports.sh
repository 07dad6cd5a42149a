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
echo "== diff -rq (raw)"
diff -rq "$OUT/base/results/reports" "$OUT/new/results/reports" && echo "reports: byte-identical"
echo "== after dropping wall-time columns and the dropped median_train_accuracy column"
"$PY" - "$OUT/base/results/reports" "$OUT/new/results/reports" <<'PY'
import csv, io, pathlib, sys
DROP_CSV = {"median_wall_time_s", "median_train_accuracy"}  # wall time; removed column
DROP_MD = {"Time (s)"}

def normal(path):
    data = path.read_bytes()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        keep = [c for c in (rows[0] if rows else {}) if c not in DROP_CSV]
        return [[r[c] for c in keep] for r in rows], keep
    if path.suffix == ".md":
        out, drop = [], []
        for line in data.decode().splitlines():
            cells = line.split(" | ") if line.startswith("| ") else None
            if cells and any(c.strip() in DROP_MD for c in cells):
                drop = [i for i, c in enumerate(cells) if c.strip() in DROP_MD]
            if cells and drop and len(cells) > max(drop):
                line = " | ".join(c for i, c in enumerate(cells) if i not in drop)
            elif not line.startswith("|"):
                drop = []  # the table ended
            out.append(line)
        return out
    return data

base, new = map(pathlib.Path, sys.argv[1:])
names = sorted({p.relative_to(base) for p in base.rglob("*") if p.is_file()}
               | {p.relative_to(new) for p in new.rglob("*") if p.is_file()})
bad = 0
for name in names:
    a, b = base / name, new / name
    if not (a.exists() and b.exists()):
        print(f"ONLY IN ONE: {name}"); bad += 1
    elif normal(a) != normal(b):
        print(f"DIFFERS: {name}"); bad += 1
    else:
        print(f"same: {name}" + ("" if a.read_bytes() == b.read_bytes() else " (after normalising)"))
print("RESULT:", "identical apart from wall time and train accuracy" if not bad else f"{bad} differ")
sys.exit(1 if bad else 0)
PY
