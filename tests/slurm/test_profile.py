"""profiles/slurm without a cluster: it covers every rule, keeps site settings out, and parses."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_TESTS = ROOT / "tests" / "workflow"
PROFILE = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
EXTRACTION_RULES = {"extract_shard"}  # one GPU per job


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    for name in ("config.yaml", "experiments.yaml"):
        shutil.copy(WORKFLOW_TESTS / name, workdir / name)
    cmd = [sys.executable, "-m", "snakemake", *args]
    cmd += ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_every_rule_has_threads_and_resources(tmp_path):
    rules = set(snakemake(tmp_path, "--list-rules").stdout.split()) - {"all"}
    assert rules, "snakemake --list-rules printed no rules"
    # Snakemake silently ignores entries for unknown rules, so a renamed rule would
    # quietly fall back to the plugin's defaults (no GPU, 1 CPU) without this check.
    assert rules <= set(PROFILE["set-resources"]), rules - set(PROFILE["set-resources"])
    assert rules <= set(PROFILE["set-threads"]), rules - set(PROFILE["set-threads"])
    for rule, res in PROFILE["set-resources"].items():
        assert res["mem_mb"] > 0 and res["runtime"] > 0, rule
        assert bool(res.get("gpu")) == (rule in EXTRACTION_RULES), rule
        if rule in EXTRACTION_RULES:
            assert res["gpu"] == 1, "one shard is one job on one GPU"


def test_site_settings_come_from_the_user():
    assert PROFILE["executor"] == "slurm"
    # default-resources from --profile or the command line must pass through untouched
    assert "default-resources" not in PROFILE
    text = (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    for key in ("slurm_partition:", "slurm_account:", "gpu_model:"):
        assert not [line for line in text.splitlines() if line.strip().startswith(key)], key


def test_readme_cluster_command_dry_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster") :]
    cmd = next(
        line for line in section.splitlines() if line.startswith("snakemake --workflow-profile")
    )
    proc = snakemake(tmp_path, *shlex.split(cmd)[1:], "-n")
    out = proc.stdout + proc.stderr
    assert "workflow specific profile profiles/slurm" in out, out[:2000]
    assert "This was a dry-run" in out
