# Stage 2: sufficient statistics (cached, never released) and private/non-private heads.
#
# Both rules keep one job per run, but `run:` executes it inside the Snakemake process (with
# force-use-threads, profiles/default), so imports, XLA compilation, verified stores and
# calibrations are paid once per process, not once per run (pipeline_lib/sweep.py). Each run
# still draws its own secret noise key and writes its own metrics.json and head.npz.
from pipeline_lib import sweep


rule compute_stats:
    input:
        train=RP["train_store"],
    output:
        stats=RP["stats"],
    log:
        RP["stats_log"],
    params:
        l2_clip_norm=lambda w: float(w.clip),
        transform=lambda w: w.transform,
        part=lambda w: w.part,
    resources:
        **rule_resources("compute_stats"),
    message:
        "Streaming X^T X and X^T Y of {wildcards.dataset}/{wildcards.backbone} "
        "({wildcards.part}; not released)"
    run:
        sweep.compute_stats_run(
            input.train,
            output=output.stats,
            log_path=log[0],
            part=params.part,
            l2_clip_norm=params.l2_clip_norm,
            transform=params.transform,
        )


rule fit_head:
    input:
        unpack(lambda w: xp.run_inputs(config, run_spec(w))),
    output:
        metrics=RP["metrics"],
        head=RP["head"],
    log:
        RP["fit_log"],
    params:
        spec=run_spec,
    resources:
        **rule_resources("fit_head"),
    message:
        "Fitting {wildcards.method} ({wildcards.budget}, seed {wildcards.seed}) "
        "for {wildcards.experiment} on {wildcards.dataset}/{wildcards.backbone}"
    run:
        sweep.fit_run(params.spec, input=input, output=output, log_path=log[0])
