# Stage 2: sufficient statistics (cached, never released) and private/non-private heads.


rule compute_stats:
    input:
        train=f"{R}/features/{{dataset}}/{{backbone}}/{{image_size}}px/train.zarr",
    output:
        stats=f"{R}/stats/{{dataset}}/{{backbone}}/{{image_size}}px/{{transform}}-C{{clip}}-{{part}}.npz",
    log:
        f"{R}/logs/compute_stats/{{dataset}}/{{backbone}}/{{image_size}}px/{{transform}}-C{{clip}}-{{part}}.log",
    params:
        l2_clip_norm=lambda w: float(w.clip),
        transform=lambda w: w.transform,
        part=lambda w: w.part,
    resources:
        **rule_resources("compute_stats"),
    message:
        "Streaming X^T X and X^T Y of {wildcards.dataset}/{wildcards.backbone} "
        "({wildcards.part}; not released)"
    conda:
        "../../environment.yml"
    script:
        "../scripts/compute_stats.py"


rule fit_head:
    input:
        unpack(lambda w: xp.run_inputs(config, run_spec(w))),
    output:
        metrics=f"{R}/runs/{{experiment}}/{{dataset}}/{{backbone}}/{{image_size}}px/{{method}}/{{budget}}/seed{{seed}}/metrics.json",
        head=f"{R}/runs/{{experiment}}/{{dataset}}/{{backbone}}/{{image_size}}px/{{method}}/{{budget}}/seed{{seed}}/head.npz",
    log:
        f"{R}/logs/fit_head/{{experiment}}/{{dataset}}/{{backbone}}/{{image_size}}px/{{method}}/{{budget}}/seed{{seed}}.log",
    params:
        spec=run_spec,
    resources:
        **rule_resources("fit_head"),
    message:
        "Fitting {wildcards.method} ({wildcards.budget}, seed {wildcards.seed}) "
        "for {wildcards.experiment} on {wildcards.dataset}/{wildcards.backbone}"
    conda:
        "../../environment.yml"
    script:
        "../scripts/fit_head.py"
