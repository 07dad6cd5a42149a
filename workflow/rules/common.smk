# Shared setup: the experiments file, the run table and path helpers.
# All logic lives in pipeline_lib.experiments so that pytest can reach it.
from pipeline_lib import experiments as xp
from pipeline_lib.job_resources import rule_resources  # CPUs, memory, runtime, GPUs per rule

# Duplicate keys, unknown keys, wrong types, empty grids: each a ConfigError naming
# the experiment, the key and the value (schema: pipeline_lib/schemas/experiments.schema.yaml).
config["experiments"] = xp.load_experiments(config["experiments_file"])
RUNS = xp.expand_runs(config)  # defaults applied here; cross-key checks (datasets, budgets)
RP = xp.run_patterns(config)  # path patterns of heads.smk and report.smk (one source)


def all_reports(cfg):
    return xp.all_reports(cfg)


def run_spec(wildcards):
    return xp.find_run(
        config,
        wildcards.experiment,
        wildcards.dataset,
        wildcards.backbone,
        wildcards.image_size,
        wildcards.method,
        wildcards.budget,
        wildcards.seed,
    )


wildcard_constraints:
    experiment=r"[^/]+",
    dataset=r"[^/]+",
    backbone=r"[^/]+",
    method=r"[^/]+",
    budget=r"eps[0-9.e+-]+|nonprivate",
    seed=r"\d+",
    image_size=r"\d+",
    split=r"train|test",
    clip=r"[0-9.e+-]+",
    transform=r"clip|normalize",
    part=r"all|fit[0-9.e-]+",
