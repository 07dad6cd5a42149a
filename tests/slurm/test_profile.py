"""Cluster settings without a cluster: per-rule requests live in the rules, the site profile
that tools/slurm_profile.sh writes holds only site settings, and both README commands parse."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_lib.job_resources import RULE_REQUESTS, rule_resources
from tests.snakemake_cmd import ROOT, run_snakemake, snakemake_env, tiny_config

PROFILE_TOOL = ROOT / "tools" / "slurm_profile.sh"
WORKFLOW_PROFILE = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
EXTRACTION_RULES = {"extract_shard"}  # one GPU per job


def snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`snakemake ARGS` from the repository root (its Snakefile) on the tiny config."""
    tiny_config(workdir)
    return run_snakemake(workdir, *args, cores=None, snakefile=False, env=env, timeout=300)


def write_profile(xdg: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CONFIG_HOME=str(xdg))
    return subprocess.run(
        ["bash", str(PROFILE_TOOL), *args], capture_output=True, text=True, env=env, timeout=60
    )


def cluster_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster") :]
    return section[: section.index("\n## ", 1)]


@pytest.mark.slow  # a snakemake process
def test_every_rule_requests_its_own_resources(tmp_path):
    rules = set(snakemake(tmp_path, "--list-rules").stdout.split()) - {"all"}
    assert rules, "snakemake --list-rules printed no rules"
    # a renamed rule without an entry would fall back to the plugin's defaults (1 CPU, no GPU)
    assert rules == set(RULE_REQUESTS), rules ^ set(RULE_REQUESTS)
    text = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    for rule in rules:
        block = text[text.index(f"rule {rule}:") :]
        block = block[: block.find("\nrule ", 1) if "\nrule " in block[1:] else None]
        assert f'**rule_resources("{rule}")' in block, f"rule {rule} must take its own resources"
    for rule, request in RULE_REQUESTS.items():
        res = rule_resources(rule)
        assert res["cpus_per_task"] >= 1 and res["mem_mb"] > 0 and res["runtime"] > 0, rule
        assert res.get("gpu", 0) == (1 if rule in EXTRACTION_RULES else 0), rule
        assert request.cpus == res["cpus_per_task"]
    with pytest.raises(KeyError, match="no entry in pipeline_lib.job_resources"):
        rule_resources("no_such_rule")


def test_workflow_profile_holds_no_per_rule_or_site_settings():
    assert WORKFLOW_PROFILE["executor"] == "slurm"
    for key in ("default-resources", "set-resources", "set-threads"):
        assert key not in WORKFLOW_PROFILE, key
    text = (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    for key in ("slurm_partition:", "slurm_account:", "gpu_model:"):
        assert not [line for line in text.splitlines() if line.strip().startswith(key)], key
    # `--profile slurm` looks in ./slurm first: a folder there would shadow the user's profile
    assert not (ROOT / "slurm").exists()


def test_profile_tool_writes_the_site_profile_to_the_standard_place(tmp_path):
    proc = write_profile(
        tmp_path, "--partition", "gpu", "--account", "me", "--status-command", "squeue",
        "--init-seconds", "5", "--jobs", "7",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "snakemake" / "slurm" / "config.yaml"
    assert str(target) in proc.stdout
    profile = yaml.safe_load(target.read_text())
    assert profile == {
        "executor": "slurm",
        "jobs": 7,
        "keep-going": True,
        "rerun-incomplete": True,
        "default-resources": {"slurm_partition": "gpu", "slurm_account": "me"},
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 5,
    }
    # a second run keeps the user's edits unless told otherwise
    again = write_profile(tmp_path, "--partition", "other")
    assert again.returncode == 2 and "--force" in again.stderr
    assert yaml.safe_load(target.read_text())["default-resources"]["slurm_partition"] == "gpu"
    forced = write_profile(tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert yaml.safe_load(target.read_text()) == {
        "executor": "slurm",
        "jobs": 100,
        "keep-going": True,
        "rerun-incomplete": True,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--status-command", "sinfo"], "must be sacct or squeue"),
        (["--jobs", "0"], "--jobs must be a positive integer"),
        (["--partition", "a b"], "partition and account"),
        (["--queue", "x"], "unknown option '--queue'"),
    ],
)
def test_profile_tool_rejects_bad_options(tmp_path, args, message):
    proc = write_profile(tmp_path, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "snakemake" / "slurm" / "config.yaml").exists()


@pytest.mark.slow  # snakemake processes
def test_readme_cluster_commands_dry_run(tmp_path):
    section = cluster_section()
    lines = [line.strip() for line in section.splitlines()]
    tool = next(line for line in lines if line.startswith("bash tools/slurm_profile.sh"))
    assert "snakemake --cores all --profile slurm" in lines
    xdg = tmp_path / "xdg"
    proc = write_profile(xdg, *shlex.split(tool)[2:])
    assert proc.returncode == 0, proc.stderr
    env = snakemake_env(XDG_CONFIG_HOME=str(xdg))
    work = tmp_path / "work"
    work.mkdir()
    out = snakemake(work, "--cores", "all", "--profile", "slurm", "-n", env=env)
    text = out.stdout + out.stderr
    assert re.search(r"Using profiles? slurm", text), text[:2000]
    assert "This was a dry-run" in text
    # the optional workflow profile is still documented and parses
    wp = next(line for line in lines if line.startswith("snakemake --workflow-profile"))
    out = snakemake(work, *shlex.split(wp)[1:], "-n")
    text = out.stdout + out.stderr
    assert "workflow specific profile profiles/slurm" in text, text[:2000]
    assert "This was a dry-run" in text
