"""Adapter: rule finalize_store -> pipeline_lib.features.jobs.run_finalize_job."""

from pipeline_lib.features.jobs import run_finalize_job
from pipeline_lib.joblog import setup_job_log

log = setup_job_log(snakemake.log[0])
run_finalize_job(
    store=snakemake.output.store,
    shard_files=list(snakemake.input.shards),
)
