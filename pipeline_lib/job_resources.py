"""What each Snakemake job asks a cluster for: CPUs, memory, wall time and GPUs.

The rules read their ``resources:`` from here (``workflow/rules/*.smk``), so the
requests travel with the workflow itself. A user's ``slurm`` profile (its
``default-resources``: partition, account) cannot drop them: Snakemake applies
default resources only to keys that a rule leaves unset. Only an explicit
``set-resources`` entry for a rule replaces that rule's values.

Locally (``snakemake --cores all``) the same numbers are harmless:

- ``cpus_per_task`` is what the SLURM executor passes to ``sbatch --cpus-per-task``.
  It is a resource, not the rule's ``threads``, because Snakemake caps threads at
  ``--cores`` even for cluster jobs, and ``--cores all`` on a login node would
  otherwise shrink every job to the login node's core count. The local scheduler
  ignores it; local parallelism still comes from each rule's ``threads``.
- ``mem_mb``, ``runtime`` and ``gpu`` constrain nothing locally unless the user
  passes ``--resources``, and then Snakemake caps each at the given total.

``tests/slurm`` checks that every rule of the workflow has an entry, and the live
SLURM test checks that each submitted job got exactly these values.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobRequest:
    """One job's request. ``runtime`` is in minutes, ``mem_mb`` in MB (host memory)."""

    cpus: int
    mem_mb: int
    runtime: int
    gpus: int = 0

    def resources(self) -> dict[str, int]:
        """The rule's ``resources:`` keyword arguments (the SLURM executor's names)."""
        out = {"cpus_per_task": self.cpus, "mem_mb": self.mem_mb, "runtime": self.runtime}
        if self.gpus:
            out["gpu"] = self.gpus  # sbatch --gpus=N (add gpu_model for --gpus=<model>:N)
        return out


RULE_REQUESTS: dict[str, JobRequest] = {
    # pre-creates the empty Zarr store of a split; no GPU
    "init_store": JobRequest(cpus=1, mem_mb=4000, runtime=30),
    # one shard of one store = one job = one GPU; CPUs decode and resize images for it;
    # host memory holds the backbone and prefetched batches. For big splits raise
    # extraction.shards in the config rather than the runtime.
    "extract_shard": JobRequest(cpus=8, mem_mb=32000, runtime=240, gpus=1),
    # checks every shard's done markers and publishes the store; no GPU
    "finalize_store": JobRequest(cpus=1, mem_mb=4000, runtime=30),
    # concatenates source stores chunk by chunk (a few chunks in memory); no GPU
    "combine_store": JobRequest(cpus=1, mem_mb=4000, runtime=60),
    # streams X^T X and per-class sums: O(d^2 + d*K) plus a few chunks in flight
    "compute_stats": JobRequest(cpus=4, mem_mb=16000, runtime=120),
    # one (experiment, method, budget, seed) run; DP-SGD on ImageNet-size features is slowest
    "fit_head": JobRequest(cpus=4, mem_mb=16000, runtime=240),
    # tables and the accuracy-vs-epsilon plot of one experiment
    "report_experiment": JobRequest(cpus=1, mem_mb=2000, runtime=15),
    # the cross-experiment index and the privacy ledger (composes every run's DpEvent)
    "report_index": JobRequest(cpus=1, mem_mb=4000, runtime=30),
}


def rule_resources(rule: str) -> dict[str, int]:
    """``resources:`` of ``rule``; a rule without an entry is a programming error."""
    try:
        return RULE_REQUESTS[rule].resources()
    except KeyError:
        raise KeyError(
            f"rule {rule!r} has no entry in pipeline_lib.job_resources.RULE_REQUESTS; "
            "add one (CPUs, memory, runtime, GPUs) so that cluster jobs get what they need"
        ) from None
