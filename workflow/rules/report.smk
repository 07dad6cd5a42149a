# Aggregation: per-experiment tables and plots, the cross-experiment index and the
# privacy ledger. Outputs wrapped in report() go into `snakemake --report report.html`.


rule report_experiment:
    input:
        metrics=lambda w: xp.experiment_metrics(config, w.experiment),
    output:
        csv=report(
            f"{R}/reports/{{experiment}}/summary.csv",
            caption="../report/summary.rst",
            category="{experiment}",
            subcategory="Tables",
            labels={"experiment": "{experiment}", "table": "summary over seeds"},
        ),
        md=f"{R}/reports/{{experiment}}/summary.md",
        runs=report(
            f"{R}/reports/{{experiment}}/runs.csv",
            caption="../report/runs.rst",
            category="{experiment}",
            subcategory="Tables",
            labels={"experiment": "{experiment}", "table": "every run"},
        ),
        png=report(
            f"{R}/reports/{{experiment}}/accuracy_vs_epsilon.png",
            caption="../report/accuracy_vs_epsilon.rst",
            category="{experiment}",
            subcategory="Accuracy vs epsilon",
            labels={"experiment": "{experiment}", "figure": "accuracy vs epsilon"},
        ),
        per_class=report(
            f"{R}/reports/{{experiment}}/per_class.csv",
            caption="../report/per_class.rst",
            category="{experiment}",
            subcategory="Tables",
            labels={"experiment": "{experiment}", "table": "per-class accuracy (best seed)"},
        ),
        confusion=report(
            f"{R}/reports/{{experiment}}/confusion.png",
            caption="../report/confusion.rst",
            category="{experiment}",
            subcategory="Confusion matrices",
            labels={"experiment": "{experiment}", "figure": "confusion matrices (best seed)"},
        ),
    log:
        f"{R}/logs/report_experiment/{{experiment}}.log",
    params:
        title=lambda w: config["experiments"][w.experiment].get("description", w.experiment),
    resources:
        **rule_resources("report_experiment"),
    message:
        "Summarising {wildcards.experiment}"
    conda:
        "../../environment.yml"
    script:
        "../scripts/report_experiment.py"


rule report_index:
    input:
        metrics=xp.all_metrics(config),
        experiment_reports=[xp.report_files(config, e)["png"] for e in config["experiments"]],
    output:
        index=f"{R}/reports/index.md",
        ledger_csv=report(
            f"{R}/reports/ledger.csv",
            caption="../report/ledger.rst",
            category="Privacy ledger",
            labels={"table": "privacy ledger"},
        ),
        ledger_md=f"{R}/reports/ledger.md",
        png=report(
            f"{R}/reports/all_experiments.png",
            caption="../report/all_experiments.rst",
            category="All experiments",
            labels={"figure": "accuracy vs epsilon, all experiments"},
        ),
    log:
        f"{R}/logs/report_index.log",
    params:
        descriptions={k: v.get("description", "") for k, v in config["experiments"].items()},
    resources:
        **rule_resources("report_index"),
    message:
        "Cross-experiment index and privacy ledger"
    conda:
        "../../environment.yml"
    script:
        "../scripts/report_index.py"
