# Stage 1: frozen-backbone features into a chunked, resumable Zarr store.


rule extract_features:
    output:
        store=directory(f"{R}/features/{{dataset}}/{{backbone}}/{{image_size}}px/{{split}}.zarr"),
    log:
        f"{R}/logs/extract_features/{{dataset}}/{{backbone}}/{{image_size}}px/{{split}}.log",
    params:
        data=lambda w: xp.dataset_options(config, w.dataset, w.split),
        extraction=config["extraction"],
    threads: workflow.cores
    resources:
        mem_mb=8000,
    message:
        "Extracting {wildcards.backbone} features of {wildcards.dataset}/{wildcards.split} "
        "at {wildcards.image_size}px"
    conda:
        "../../environment.yml"
    script:
        "../scripts/extract_features.py"
