"""Adapter: rule report_index -> pipeline_lib.reporting.build_index (index + privacy ledger)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _log  # noqa: E402

from pipeline_lib.reporting import build_index  # noqa: E402
from pipeline_lib.run_outputs import verify_runs  # noqa: E402

log = _log.setup(snakemake)  # noqa: F821
verify_runs(snakemake.input.metrics)  # noqa: F821  (each head.npz and metrics.json)
out = snakemake.output  # noqa: F821
build_index(
    snakemake.input.metrics,  # noqa: F821
    {"index": out.index, "ledger_csv": out.ledger_csv, "ledger_md": out.ledger_md, "png": out.png},
    descriptions=snakemake.params.descriptions,  # noqa: F821
)
log.info("index and ledger written to %s", Path(out.index).parent)
