# DP image classification from pre-trained features.
#   snakemake --cores all                       # local, profiles/default applies itself
#   snakemake --cores all --profile slurm       # on SLURM, after tools/slurm_profile.sh (README)
# Runs are defined in config/experiments.yaml; see README.md.
import os

from snakemake.utils import min_version, validate

from pipeline_lib.experiments import CONFIG_SCHEMA_NAME, schema_path, validate_config
from pipeline_lib.threads import limit_blas_threads

min_version("9.0")

# Several `run:` jobs (head fits) run at once in this process: one BLAS thread each, or their
# OpenBLAS pools fight (pipeline_lib/threads.py; a DP-Newton fit was 10x slower). Script jobs
# (extraction, reports) inherit the setting; their heavy work runs in XLA.
limit_blas_threads(1)


configfile: "config/config.yaml"


validate_config(config)  # errors for people (key, value, fix); runs before snakemake's own
validate(config, schema_path(CONFIG_SCHEMA_NAME))  # pipeline_lib/schemas/ (package data)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/heads.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_reports(config),
    default_target: True


onsuccess:
    from pipeline_lib.reporting import terminal_summary

    try:
        reports = os.path.dirname(xp.index_files(config)["index"])
        print(terminal_summary(xp.all_metrics(config), reports))
    except (OSError, ValueError) as exc:  # a partial target (e.g. one store) has no runs yet
        print(f"(no summary: {exc})")
