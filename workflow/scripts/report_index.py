"""Adapter: rule report_index -> pipeline_lib.reporting.build_index (index + privacy ledger)."""

from pathlib import Path

from pipeline_lib.joblog import setup_job_log
from pipeline_lib.reporting import build_index
from pipeline_lib.run_outputs import verify_runs

log = setup_job_log(snakemake.log[0])
verify_runs(snakemake.input.metrics)  # each head.npz and metrics.json
out = snakemake.output
build_index(
    snakemake.input.metrics,
    {"index": out.index, "ledger_csv": out.ledger_csv, "ledger_md": out.ledger_md, "png": out.png},
    descriptions=snakemake.params.descriptions,
)
log.info("index and ledger written to %s", Path(out.index).parent)
