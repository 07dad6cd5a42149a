"""The one way the tests start Snakemake: its command line, its environment, its job table.

Every test that runs `snakemake` builds the command here, so the interpreter, the Snakefile,
the `--directory`/`--configfile` pair and the PYTHONPATH that makes every job import this
checkout's `pipeline_lib` are the same in every test file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
WORKFLOW_TESTS = ROOT / "tests" / "workflow"  # the tiny config: config.yaml, experiments.yaml
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def snakemake_cmd(
    workdir: Path,
    *args: str,
    cores: int | str | None = 2,
    snakefile: bool = True,
    configfile: bool = True,
) -> list[str]:
    """`python -m snakemake ARGS [-s Snakefile] --directory W [--configfile W/config.yaml]
    [--cores N]`. `snakefile=False` leaves the Snakefile to Snakemake (it finds the one in the
    repository root when run from there, as the README's commands are); `configfile=False`
    leaves the Snakefile's own config; `cores=None` adds no `--cores` (when ARGS carry their
    own, or a profile sets it)."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    if snakefile:
        cmd += ["-s", str(SNAKEFILE)]
    cmd += ["--directory", str(workdir)]
    if configfile:
        cmd += ["--configfile", str(Path(workdir) / "config.yaml")]
    if cores is not None:
        cmd += ["--cores", str(cores)]
    return cmd


def snakemake_env(*pythonpath: Path | str, **variables: str) -> dict[str, str]:
    """This environment with `pythonpath` and then this checkout first on PYTHONPATH (so the
    jobs import this `pipeline_lib`, not another installed one), plus `variables`."""
    parts = [*map(str, pythonpath), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in parts if p), **variables)


def run_snakemake(
    workdir: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 1200,
    cores: int | str | None = 2,
    snakefile: bool = True,
    configfile: bool = True,
) -> subprocess.CompletedProcess:
    """Run `snakemake_cmd(...)` from the repository root and capture its output; with
    `check`, a failure raises with the command and the end of both streams."""
    cmd = snakemake_cmd(workdir, *args, cores=cores, snakefile=snakefile, configfile=configfile)
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=snakemake_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table (printed by a dry run, and before a real run)."""
    lines = output[output.index("Job stats:") :].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def tiny_config(workdir: Path) -> Path:
    """Copy the tiny config (tests/workflow/config.yaml and experiments.yaml) into workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "experiments.yaml"):
        shutil.copy(WORKFLOW_TESTS / name, workdir / name)
    return workdir


def copy_workflow(src: Path, dst: Path) -> Path:
    """A copy of a finished workflow folder that Snakemake sees as up to date (file times
    are kept), for a test that changes it."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
