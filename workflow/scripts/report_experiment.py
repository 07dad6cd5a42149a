"""Adapter: rule report_experiment -> pipeline_lib.reporting.build_report."""

from pathlib import Path

from pipeline_lib.joblog import setup_job_log
from pipeline_lib.reporting import build_report
from pipeline_lib.run_outputs import verify_runs

log = setup_job_log(snakemake.log[0])
verify_runs(snakemake.input.metrics)  # each head.npz and metrics.json
out = Path(snakemake.output.csv).parent
build_report(snakemake.input.metrics, out, title=snakemake.params.title)
log.info("report written to %s", out)
