"""Adapter: rule init_store -> pipeline_lib.features.jobs.run_init_job."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _log  # noqa: E402

from pipeline_lib import experiments as xp  # noqa: E402
from pipeline_lib.features.jobs import run_init_job  # noqa: E402

log = _log.setup(snakemake)  # noqa: F821
w, config = snakemake.wildcards, snakemake.config  # noqa: F821
run_init_job(
    dataset=w.dataset,
    dataset_spec=config["datasets"][w.dataset],
    split=w.split,
    backbone=w.backbone,
    image_size=int(w.image_size),
    extraction=xp.extraction_options(config),
    backbone_options=xp.backbone_options(config, w.backbone),
    store=snakemake.params.store,  # noqa: F821
    done_file=snakemake.output.done,  # noqa: F821
)
