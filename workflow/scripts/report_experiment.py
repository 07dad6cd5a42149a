"""Adapter: rule report_experiment -> pipeline_lib.reporting.build_report."""

from pipeline_lib.experiments import REPORT_FILES
from pipeline_lib.joblog import setup_job_log
from pipeline_lib.reporting import build_report
from pipeline_lib.run_outputs import verify_runs

log = setup_job_log(snakemake.log[0])
verify_runs(snakemake.input.metrics)  # each head.npz and metrics.json
outputs = {kind: snakemake.output[kind] for kind in REPORT_FILES}  # what the rule declares
build_report(snakemake.input.metrics, outputs, title=snakemake.params.title)
log.info("report written to %s", ", ".join(outputs.values()))
