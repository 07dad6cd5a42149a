# Aggregation: per-experiment tables and plots, the cross-experiment index and the
# privacy ledger. Outputs wrapped in report() go into `snakemake --report report.html`.
# Paths: RP = xp.run_patterns(config) (common.smk); each builder writes exactly these outputs.


rule report_experiment:
    input:
        metrics=lambda w: xp.experiment_metrics(config, w.experiment),
    output:
        csv=report(
            RP["report_csv"],
            caption="../report/summary.rst",
            category="{experiment}",
            subcategory="Tables",
            labels={"experiment": "{experiment}", "table": "summary over seeds"},
        ),
        md=RP["report_md"],
        runs=report(
            RP["report_runs"],
            caption="../report/runs.rst",
            category="{experiment}",
            subcategory="Tables",
            labels={"experiment": "{experiment}", "table": "every run"},
        ),
        png=report(
            RP["report_png"],
            caption="../report/accuracy_vs_epsilon.rst",
            category="{experiment}",
            subcategory="Accuracy vs epsilon",
            labels={"experiment": "{experiment}", "figure": "accuracy vs epsilon"},
        ),
        per_class=report(
            RP["report_per_class"],
            caption="../report/per_class.rst",
            category="{experiment}",
            subcategory="Tables",
            labels={"experiment": "{experiment}", "table": "per-class accuracy (best seed)"},
        ),
        confusion=report(
            RP["report_confusion"],
            caption="../report/confusion.rst",
            category="{experiment}",
            subcategory="Confusion matrices",
            labels={"experiment": "{experiment}", "figure": "confusion matrices (best seed)"},
        ),
    log:
        RP["report_log"],
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
        index=RP["index_index"],
        ledger_csv=report(
            RP["index_ledger_csv"],
            caption="../report/ledger.rst",
            category="Privacy ledger",
            labels={"table": "privacy ledger"},
        ),
        ledger_md=RP["index_ledger_md"],
        png=report(
            RP["index_png"],
            caption="../report/all_experiments.rst",
            category="All experiments",
            labels={"figure": "accuracy vs epsilon, all experiments"},
        ),
    log:
        RP["index_log"],
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
