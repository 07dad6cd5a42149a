# DP image classification from pre-trained features.
#   snakemake --cores all                       # local, profiles/default applies itself
#   snakemake --profile profiles/slurm          # on a SLURM cluster
# Runs are defined in config/experiments.yaml; see README.md.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/heads.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_reports(config),
    default_target: True
