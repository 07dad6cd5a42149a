"""Adapter: rule report_experiment -> pipeline_lib.reporting.build_report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _log  # noqa: E402

from pipeline_lib.reporting import build_report  # noqa: E402
from pipeline_lib.run_outputs import verify_runs  # noqa: E402

log = _log.setup(snakemake)  # noqa: F821
verify_runs(snakemake.input.metrics)  # noqa: F821  (each head.npz and metrics.json)
out = Path(snakemake.output.csv).parent  # noqa: F821
build_report(snakemake.input.metrics, out, title=snakemake.params.title)  # noqa: F821
log.info("report written to %s", out)
