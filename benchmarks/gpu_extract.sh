#!/usr/bin/env bash
# ViT-B/16 feature-extraction throughput on the GPU(s) of this machine, in bfloat16.
#
# What it measures: img/s of the jitted ViT-B/16 forward pass (224 px, random-init
# weights, no checkpoint needed, images already on the device), data-parallel over all
# local devices with jax.sharding, and the fraction of the devices' peak dense bf16
# FLOP/s that this achieves (model FLOPs from XLA's cost analysis x img/s / peak). The
# peak per device comes from a small table keyed by jax's device_kind in
# benchmarks/extract.py (H100/H200 SXM 989 TFLOP/s, H100 PCIe 756, A100 312, ...);
# set PEAK_BF16_TFLOPS to override it.
#
# Needs: a CUDA-enabled jax (and flax, numpy) already installed; no network. Runs in well
# under 5 minutes (compilation ~1 min, timing a few seconds).
#
# Usage, from anywhere:
#   bash benchmarks/gpu_extract.sh                    # python from PATH
#   PYTHON=/path/to/venv/bin/python PER_DEVICE_BATCH=128 bash benchmarks/gpu_extract.sh
#
# Output: a summary line on stdout, and one JSON line appended to
# benchmarks/gpu_extract_results.jsonl (override with OUT=...). Record the figures in
# benchmarks/RESULTS.md ("Extraction throughput") with the machine they came from.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-256}"
REPEATS="${REPEATS:-20}"
OUT="${OUT:-benchmarks/gpu_extract_results.jsonl}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

read -r BACKEND NDEV KIND < <("$PYTHON" -c \
  'import jax; d = jax.local_devices(); print(jax.default_backend(), len(d), d[0].device_kind.replace(" ", "_"))')
if [[ -z "${NDEV:-}" ]]; then
  echo "error: could not import jax with $PYTHON" >&2
  exit 1
fi
echo "backend: $BACKEND, devices: $NDEV x $KIND"
if [[ "$BACKEND" == "cpu" && "${ALLOW_CPU:-0}" != "1" ]]; then
  echo "error: jax sees no accelerator (backend cpu); install a CUDA-enabled jax, or set ALLOW_CPU=1" >&2
  exit 1
fi

timeout 270 "$PYTHON" benchmarks/extract.py \
  --models vit:B/16 --image-size 224 --dtype bfloat16 \
  --batch $((PER_DEVICE_BATCH * NDEV)) --repeats "$REPEATS" \
  --out "$OUT" --note "benchmarks/gpu_extract.sh, per-device batch $PER_DEVICE_BATCH"
