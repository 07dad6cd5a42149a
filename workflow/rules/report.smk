# Aggregation: accuracy-vs-epsilon tables and plot per experiment.


rule report_experiment:
    input:
        metrics=lambda w: xp.experiment_metrics(config, w.experiment),
    output:
        csv=f"{R}/reports/{{experiment}}/summary.csv",
        md=f"{R}/reports/{{experiment}}/summary.md",
        png=report(
            f"{R}/reports/{{experiment}}/accuracy_vs_epsilon.png",
            caption="../report/accuracy_vs_epsilon.rst",
            category="Accuracy vs epsilon",
            labels={"experiment": "{experiment}"},
        ),
    log:
        f"{R}/logs/report_experiment/{{experiment}}.log",
    params:
        title=lambda w: w.experiment,
    message:
        "Summarising {wildcards.experiment}"
    conda:
        "../../environment.yml"
    script:
        "../scripts/report_experiment.py"
