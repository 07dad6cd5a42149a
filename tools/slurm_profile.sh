#!/usr/bin/env bash
# Write your SLURM site profile, so that `snakemake --cores all --profile slurm` works from the
# repository root:
#
#   bash tools/slurm_profile.sh --partition gpu --account myacct
#
# It writes ${XDG_CONFIG_HOME:-~/.config}/snakemake/slurm/config.yaml, where
# `snakemake --profile slurm` finds it (Snakemake searches ./slurm, then
# $XDG_CONFIG_HOME/snakemake/slurm, then /etc/xdg/snakemake/slurm). The profile holds only
# what belongs to your site: the executor, partition, account, how many jobs may be queued and,
# on clusters without an accounting database (slurmdbd), how job status is read. What each
# job needs (CPUs, memory, runtime, a GPU per extraction shard) is in the workflow's rules and
# is not repeated here, so this profile cannot drop it.
#
# Options:
#   --partition P        default partition of every job (sbatch -p); omit for the cluster's default
#   --account A          account charged (sbatch -A); omit to let the plugin guess it
#   --jobs N             at most N jobs queued or running at once (default 100)
#   --status-command C   sacct (default; needs slurmdbd) or squeue (clusters without slurmdbd;
#                        needs MinJobAge >= 3 x the initial status delay, see
#                        `scontrol show config | grep MinJobAge`)
#   --init-seconds S     seconds before the first status check (plugin default 40)
#   --dir D              write D/config.yaml instead (default: the standard place above)
#   --force              replace an existing profile (otherwise refuse, to keep your edits)
set -euo pipefail

die() { echo "slurm_profile: ERROR: $*" >&2; exit 2; }

partition="" account="" jobs=100 status="" init="" dir="" force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --partition) partition=${2:?--partition needs a value}; shift 2 ;;
    --account) account=${2:?--account needs a value}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a value}; shift 2 ;;
    --status-command) status=${2:?--status-command needs a value}; shift 2 ;;
    --init-seconds) init=${2:?--init-seconds needs a value}; shift 2 ;;
    --dir) dir=${2:?--dir needs a value}; shift 2 ;;
    --force) force=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$jobs'"
case "$status" in
  "" | sacct | squeue) ;;
  *) die "--status-command must be sacct or squeue, got '$status'" ;;
esac
[ -z "$init" ] || [[ "$init" =~ ^[1-9][0-9]*$ ]] \
  || die "--init-seconds must be a positive integer, got '$init'"
for value in "$partition" "$account"; do
  [[ "$value" =~ ^[A-Za-z0-9_.,:@+-]*$ ]] || die "partition and account take letters, digits and _.,:@+- only, got '$value'"
done

dir=${dir:-${XDG_CONFIG_HOME:-$HOME/.config}/snakemake/slurm}
target=$dir/config.yaml
if [ -e "$target" ] && [ "$force" -ne 1 ]; then
  die "$target exists; rerun with --force to replace it, or edit it by hand"
fi

mkdir -p "$dir"
tmp=$(mktemp "$dir/.config.yaml.XXXXXX")
{
  echo "# SLURM site profile, written by tools/slurm_profile.sh; used by \`snakemake --profile slurm\`."
  echo "# Per-rule CPUs, memory, runtime and GPUs come from the workflow's rules; do not add"
  echo "# set-resources or set-threads here unless you mean to override them."
  echo "executor: slurm"
  echo "jobs: $jobs                 # at most this many SLURM jobs queued or running at once"
  echo "keep-going: true           # a failed job stops only its dependants"
  echo "rerun-incomplete: true     # redo jobs that SLURM killed (time limit, preemption)"
  if [ -n "$partition" ] || [ -n "$account" ]; then
    echo "default-resources:         # applied only where a rule sets no value of its own"
    [ -z "$partition" ] || echo "  slurm_partition: \"$partition\""
    [ -z "$account" ] || echo "  slurm_account: \"$account\""
  fi
  [ -z "$status" ] || echo "slurm-status-command: $status   # how finished jobs are detected"
  [ -z "$init" ] || echo "slurm-init-seconds-before-status-checks: $init"
} >"$tmp"
mv "$tmp" "$target"
echo "slurm_profile: wrote $target"
echo "slurm_profile: now run, from the repository root: snakemake --cores all --profile slurm"
