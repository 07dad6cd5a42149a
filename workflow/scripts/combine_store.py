"""Adapter: rule combine_store -> pipeline_lib.features.combine.combine_stores."""

from pipeline_lib import experiments as xp
from pipeline_lib.features.combine import combine_stores
from pipeline_lib.joblog import setup_job_log

log = setup_job_log(snakemake.log[0])
w, config = snakemake.wildcards, snakemake.config
settings = snakemake.params.settings
sources = [
    (f"{s['backbone']}@{s['image_size']}px", path)
    for s, path in zip(settings["sources"], snakemake.input.sources, strict=True)
]
stats = combine_stores(
    snakemake.output.store,
    sources,
    name=w.backbone,
    image_size=int(w.image_size),
    source_normalization=settings["source_normalization"],
    chunk_rows=int(xp.extraction_options(config)["chunk_rows"]),
)
log.info("combined %s: %s", snakemake.output.store, stats)
