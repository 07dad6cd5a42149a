"""Send this job's logging and stderr to its Snakemake log file."""

import logging
import sys


def setup(snakemake):
    handle = open(snakemake.log[0], "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    sys.stderr = handle
    logging.basicConfig(
        stream=handle, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return logging.getLogger("workflow")
