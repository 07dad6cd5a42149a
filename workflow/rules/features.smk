# Stage 1: frozen-backbone features into a chunked, resumable Zarr store.
# One store = init_store (once) -> extract_shard (S jobs, in parallel) -> finalize_store.
# S is extraction.shards, or extraction.shards_per_dataset[dataset]. Each job's output is a
# small JSON in <store>.inprogress/jobs/; chunk data is never a declared output, so a killed
# shard job rerun by Snakemake resumes its chunks instead of starting over.
EP = xp.extraction_patterns(config)


wildcard_constraints:
    shard=r"\d+",
    num_shards=r"\d+",


rule init_store:
    output:
        done=EP["init"],
    log:
        EP["init_log"],
    params:
        settings=lambda w: xp.extraction_store_settings(config, w.dataset, w.backbone),
        store=lambda w: EP["store"].format(**dict(w.items())),
    threads: 1
    resources:
        **rule_resources("init_store"),
    message:
        "Creating the {wildcards.backbone} feature store of "
        "{wildcards.dataset}/{wildcards.split} at {wildcards.image_size}px"
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract_init.py"


rule extract_shard:
    input:
        init=EP["init"],
    output:
        done=EP["shard"],
    log:
        EP["shard_log"],
    params:
        settings=lambda w: xp.extraction_store_settings(config, w.dataset, w.backbone),
        store=lambda w: EP["store"].format(**dict(w.items())),
    threads: workflow.cores
    resources:
        **rule_resources("extract_shard"),
    message:
        "Extracting {wildcards.backbone} features of {wildcards.dataset}/{wildcards.split} "
        "at {wildcards.image_size}px: shard {wildcards.shard} of {wildcards.num_shards}"
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract_shard.py"


rule finalize_store:
    wildcard_constraints:
        backbone=xp.backbone_wildcard(config, combined=False),
    input:
        shards=lambda w: xp.shard_done_paths(
            config, w.dataset, w.backbone, w.image_size, w.split
        ),
    output:
        store=directory(EP["store"]),
    log:
        EP["finalize_log"],
    params:
        settings=lambda w: xp.extraction_store_settings(config, w.dataset, w.backbone),
    threads: 1
    resources:
        **rule_resources("finalize_store"),
    message:
        "Checking and publishing {output.store}"
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract_finalize.py"


# Feature combinations (backbones.<name>.model: combine): a derived store whose rows
# concatenate the rows of its source stores, written and verified like an extracted one.
# Resumable: finished chunks have done markers in <store>.inprogress/, which a rerun keeps.
CP = xp.combine_patterns(config)


rule combine_store:
    wildcard_constraints:
        backbone=xp.backbone_wildcard(config, combined=True),
    input:
        sources=lambda w: xp.combination_source_paths(
            config, w.dataset, w.backbone, w.image_size, w.split
        ),
    output:
        store=directory(CP["store"]),
    log:
        CP["log"],
    params:
        settings=lambda w: xp.combination_settings(config, w.dataset, w.backbone, w.image_size),
    threads: 1
    resources:
        **rule_resources("combine_store"),
    message:
        "Combining the stores of {wildcards.backbone} for {wildcards.dataset}/{wildcards.split}"
    conda:
        "../../environment.yml"
    script:
        "../scripts/combine_store.py"
