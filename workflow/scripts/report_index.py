"""Adapter: rule report_index -> pipeline_lib.reporting.build_index (index + privacy ledger)."""

from pipeline_lib.experiments import INDEX_FILES
from pipeline_lib.joblog import setup_job_log
from pipeline_lib.reporting import build_index
from pipeline_lib.run_outputs import verify_runs

log = setup_job_log(snakemake.log[0])
verify_runs(snakemake.input.metrics)  # each head.npz and metrics.json
outputs = {kind: snakemake.output[kind] for kind in INDEX_FILES}  # what the rule declares
build_index(snakemake.input.metrics, outputs, descriptions=snakemake.params.descriptions)
log.info("index and ledger written to %s", ", ".join(outputs.values()))
