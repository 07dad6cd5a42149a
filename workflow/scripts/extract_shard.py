"""Adapter: rule extract_shard -> pipeline_lib.features.jobs.run_shard_job."""

from pipeline_lib import experiments as xp
from pipeline_lib.features.jobs import run_shard_job
from pipeline_lib.joblog import setup_job_log

log = setup_job_log(snakemake.log[0])
w, config = snakemake.wildcards, snakemake.config
stats = run_shard_job(
    dataset=w.dataset,
    dataset_spec=config["datasets"][w.dataset],
    split=w.split,
    backbone=w.backbone,
    image_size=int(w.image_size),
    extraction=xp.extraction_options(config),  # speed knobs too; they are not rule params
    backbone_options=xp.backbone_options(config, w.backbone),
    store=snakemake.params.store,
    shard=int(w.shard),
    num_shards=int(w.num_shards),
    done_file=snakemake.output.done,
)
log.info("shard %s of %s: %s", w.shard, w.num_shards, stats)
