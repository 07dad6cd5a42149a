"""Adapter: rule init_store -> pipeline_lib.features.jobs.run_init_job."""

from pipeline_lib import experiments as xp
from pipeline_lib.features.jobs import run_init_job
from pipeline_lib.joblog import setup_job_log

log = setup_job_log(snakemake.log[0])
w, config = snakemake.wildcards, snakemake.config
run_init_job(
    dataset=w.dataset,
    dataset_spec=config["datasets"][w.dataset],
    split=w.split,
    backbone=w.backbone,
    image_size=int(w.image_size),
    extraction=xp.extraction_options(config),
    backbone_options=xp.backbone_options(config, w.backbone),
    store=snakemake.params.store,
    done_file=snakemake.output.done,
)
