#!/usr/bin/env bash
# Idempotent setup for a fresh Debian/Ubuntu machine (or any machine with python3 >= 3.10):
#   - the Fashion-MNIST Debian package, when apt is available and the files are absent;
#   - a virtual environment in .venv with pipeline_lib and everything the workflow and tests need.
# Re-running is cheap: the pip step is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  command -v apt-get >/dev/null || return 1
  as_root apt-get update -qq >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Debian package dataset-fashion-mnist"
  apt_install dataset-fashion-mnist || echo "setup: WARNING: could not install dataset-fashion-mnist; set datasets.fashion_mnist.data_dir or allow_network in config/config.yaml" >&2
fi

# SLURM and munge for tests/slurm (a live single-node cluster on localhost, started and stopped
# by tools/slurm/local_cluster.sh). Only as root or with passwordless sudo, only when missing;
# without them that test skips. The Debian packages may enable system services; the test does
# not use those.
if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ] \
  || ! command -v sbatch >/dev/null; then
  if [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; then
    echo "setup: installing Debian packages slurmctld slurmd slurm-client munge (for tests/slurm)"
    apt_install --no-install-recommends slurmctld slurmd slurm-client munge \
      || echo "setup: WARNING: could not install SLURM; tests/slurm will fail as root" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv && "$PY" -m venv .venv
  fi
fi

stamp=.venv/.pipeline_lib-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[lite12,workflow,test]"
  echo "$want" > "$stamp"
fi
