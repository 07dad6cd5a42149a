"""Send a workflow job's logging and stderr to its Snakemake log file."""

from __future__ import annotations

import logging
import sys


def setup_job_log(log_path: str) -> logging.Logger:
    """Logging (INFO) and stderr of this job go to `log_path`; returns the workflow logger."""
    handle = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    sys.stderr = handle
    logging.basicConfig(
        stream=handle, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return logging.getLogger("workflow")
