"""Adapter: rule finalize_store -> pipeline_lib.features.jobs.run_finalize_job."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _log  # noqa: E402

from pipeline_lib.features.jobs import run_finalize_job  # noqa: E402

log = _log.setup(snakemake)  # noqa: F821
run_finalize_job(
    store=snakemake.output.store,  # noqa: F821
    shard_files=list(snakemake.input.shards),  # noqa: F821
)
