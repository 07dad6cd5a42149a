# Shared setup: the experiments file, the run table and path helpers.
# All logic lives in pipeline_lib.experiments so that pytest can reach it.
import yaml
from snakemake.utils import validate

from pipeline_lib import experiments as xp

with open(config["experiments_file"]) as _f:
    config["experiments"] = (yaml.safe_load(_f) or {}).get("experiments")
validate(config, "../schemas/experiments.schema.yaml")
RUNS = xp.expand_runs(config)  # raises a ConfigError naming experiment, key and value
R = config["results_dir"]


def all_reports(cfg):
    return xp.all_reports(cfg)


def run_spec(wildcards):
    return xp.find_run(
        config, wildcards.experiment, wildcards.method, wildcards.budget, wildcards.seed
    )


wildcard_constraints:
    budget=r"eps[0-9.e+-]+|nonprivate",
    seed=r"\d+",
    image_size=r"\d+",
    split=r"train|test",
    clip=r"[0-9.e+-]+",
    transform=r"clip|normalize",
