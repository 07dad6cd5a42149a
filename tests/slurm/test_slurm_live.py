"""The tiny workflow through a live single-node SLURM (slurmctld + slurmd + munged on localhost).

The cluster comes from tools/slurm/local_cluster.sh. The site profile is written by the
`bash tools/slurm_profile.sh ...` command that README.md's "Running on a cluster" section gives
for clusters without slurmdbd (read from the README itself) into a temporary XDG_CONFIG_HOME,
and the workflow runs with exactly `snakemake --cores all --profile slurm`, plus
--directory/--configfile for a tiny config. CI runs as root, after tools/setup_env.sh has
installed the Debian packages, so there this test must run; elsewhere it skips unless it may
start daemons (root or passwordless sudo) and the packages are present.
"""

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline_lib.job_resources import RULE_REQUESTS
from tests.snakemake_cmd import (
    FMNIST,
    ROOT,
    WORKFLOW_TESTS,
    job_counts,
    run_snakemake,
    snakemake_env,
)

CLUSTER = ROOT / "tools" / "slurm" / "local_cluster.sh"
PROFILE_TOOL = ROOT / "tools" / "slurm_profile.sh"
COMMAND = ["snakemake", "--cores", "all", "--profile", "slurm"]  # as the README promises
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")
pytestmark = pytest.mark.slow


def readme_profile_command() -> list[str]:
    """The CI variant of the profile command, exactly as README.md prints it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running on a cluster") :]
    section = section[: section.index("\n## ", 1)]
    lines = [
        line.strip()
        for line in section.splitlines()
        if line.strip().startswith("bash tools/slurm_profile.sh") and "--partition ci" in line
    ]
    assert len(lines) == 1, f"README must show exactly one CI profile command, found {lines}"
    assert COMMAND_TEXT in section, f"README must show {COMMAND_TEXT!r}"
    return shlex.split(lines[0])


COMMAND_TEXT = " ".join(COMMAND)


def tiny_config_one_shard() -> dict:
    """The tiny config with one extraction shard per store (the shards are tested locally)."""
    config = yaml.safe_load((WORKFLOW_TESTS / "config.yaml").read_text())
    config["extraction"]["shards"] = 1
    return config


def tiny_experiments() -> dict:
    """The tiny config cut to one job per kind where it can be (12 SLURM jobs, not 33):
    every rule still runs, and each job is checked against its rule's request."""
    exps = yaml.safe_load((WORKFLOW_TESTS / "experiments.yaml").read_text())
    tiny = exps["experiments"]["tiny"]
    tiny.update(epsilons=[1], seeds=[0])
    tiny["methods"] = {k: tiny["methods"][k] for k in ("dp_ls", "dp_sgd")}
    tiny["baselines"] = {"nonprivate_ridge": tiny["baselines"]["nonprivate_ridge"]}
    return {"experiments": {"tiny": tiny}}


def _as_root() -> list[str] | None:
    """Prefix that runs a command as root, or None where that is impossible."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        ok = subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return ["sudo", "-n"]
    return None


def _has(binary: str) -> bool:
    return shutil.which(binary) is not None or Path("/usr/sbin", binary).exists()


def _profile_floor() -> dict[str, str]:
    """Node size (CPUs, MB) for local_cluster.sh: room for two of the biggest requests."""
    threads = max(r.cpus for r in RULE_REQUESTS.values())
    mem_mb = max(r.mem_mb for r in RULE_REQUESTS.values())
    return {"SLURM_LOCAL_MIN_CPUS": str(2 * threads), "SLURM_LOCAL_MIN_MEM_MB": str(2 * mem_mb)}


@contextlib.contextmanager
def one_cluster_at_a_time(timeout_s: float = 1800):
    """Hold an exclusive lock for as long as a live cluster runs: the cluster listens on fixed
    ports, so a second one (another xdist worker, or another test session on this machine)
    waits here until the first is stopped."""
    path = Path(tempfile.gettempdir()) / "pipeline_lib-slurm-live.lock"
    with open(path, "a") as lock:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another live SLURM test held {path} for {timeout_s:.0f} s")
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Start the cluster; always stop the daemons it started (by PID), whatever happens.
    One live cluster at a time: see `one_cluster_at_a_time`."""
    if not FMNIST.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    root = _as_root()
    missing = [b for b in SLURM_BINARIES if not _has(b)]
    if root is None:
        pytest.skip(
            "starting munged/slurmctld/slurmd needs root or passwordless sudo "
            "(CI runs as root; see tools/slurm/local_cluster.sh)"
        )
    if missing:
        pytest.fail(
            f"SLURM packages missing ({', '.join(missing)}) although we are root: run "
            "tools/setup_env.sh, or apt-get install --no-install-recommends "
            "slurmctld slurmd slurm-client munge"
        )
    state = tmp_path_factory.mktemp("slurm-state")
    state.chmod(0o755)
    env_args = ["env", *(f"{k}={v}" for k, v in _profile_floor().items())]
    with one_cluster_at_a_time():
        yield from _run_cluster(root, env_args, state)


def _run_cluster(root: list[str], env_args: list[str], state: Path):
    try:
        start = subprocess.run(
            [*root, *env_args, "bash", str(CLUSTER), "start", str(state)],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert start.returncode == 0, f"cluster did not start:\n{start.stdout}\n{start.stderr}"
        yield state
    finally:
        stop = subprocess.run(
            [*root, "bash", str(CLUSTER), "stop", str(state)],
            capture_output=True,
            text=True,
            timeout=180,
        )
        print(stop.stdout, stop.stderr)


@pytest.fixture(scope="module")
def site_profile(tmp_path_factory) -> Path:
    """XDG_CONFIG_HOME holding the `slurm` profile that the README's command writes."""
    xdg = tmp_path_factory.mktemp("xdg")
    cmd = readme_profile_command()
    assert cmd[:2] == ["bash", "tools/slurm_profile.sh"]
    env = dict(os.environ, XDG_CONFIG_HOME=str(xdg))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (xdg / "snakemake" / "slurm" / "config.yaml").is_file()
    return xdg


def snakemake_slurm(workdir: Path, xdg: Path, timeout: int) -> subprocess.CompletedProcess:
    """Exactly COMMAND (no -s: run from the repository root, as the README says), plus
    --directory/--configfile; the jobs get this checkout's PYTHONPATH and interpreter."""
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    env = snakemake_env(XDG_CONFIG_HOME=str(xdg), PATH=path)
    proc = run_snakemake(
        workdir, *COMMAND[1:], cores=None, snakefile=False, env=env, check=False, timeout=timeout
    )
    (workdir / f"snakemake-{len(list(workdir.glob('snakemake-*.log')))}.log").write_text(
        proc.stdout + proc.stderr
    )
    return proc


def slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict; finished jobs stay there for MinJobAge=600 s."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(tok.split("=", 1) for tok in shlex.split(out) if "=" in tok)


def memory_mb(value: str) -> int:
    """scontrol prints --mem 2000 as 2000M and --mem 16384 as 16G."""
    scale = {"M": 1, "G": 1024, "T": 1024**2}
    return int(float(value[:-1]) * scale[value[-1]])


def rule_of(job: dict[str, str]) -> str:
    """The executor labels each SLURM job with --comment rule_<name>[_wildcards_...]."""
    return job["Comment"].removeprefix("rule_").split("_wildcards_")[0]


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, site_profile, tmp_path_factory):
    work = tmp_path_factory.mktemp("wf-slurm")
    (work / "config.yaml").write_text(yaml.safe_dump(tiny_config_one_shard()))
    (work / "experiments.yaml").write_text(yaml.safe_dump(tiny_experiments()))
    proc = snakemake_slurm(work, site_profile, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Using profiles slurm" in out or "Using profile slurm" in out, out[:2000]
    return work, out, site_profile


def test_tiny_workflow_runs_through_slurm(slurm_cluster, slurm_run):
    work, out, _ = slurm_run
    counts = job_counts(out)
    ids = SUBMITTED.findall(out)
    # every job except the target rule `all` (which runs nothing) was an sbatch submission
    assert len(ids) == len(set(ids)) == counts["total"] - 1, (counts, ids)
    assert f"{counts['total']} of {counts['total']} steps (100%) done" in out

    squeue = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    finished = dict(line.split("|") for line in squeue.split())
    jobcomp = (slurm_cluster / "log" / "jobcomp.txt").read_text()
    per_rule: dict[str, int] = {}
    seen: dict[str, tuple] = {}
    for job_id in ids:
        assert finished.get(job_id) == "COMPLETED", (job_id, finished)
        assert re.search(rf"JobId={job_id} .*JobState=COMPLETED", jobcomp), job_id
        job = slurm_job(job_id)
        rule = rule_of(job)
        per_rule[rule] = per_rule.get(rule, 0) + 1
        want = RULE_REQUESTS[rule]
        seen[rule] = (job["NumCPUs"], job["MinMemoryNode"], job.get("TresPerJob", ""))
        assert job["Partition"] == "ci"
        assert job["NumCPUs"] == str(want.cpus), (rule, job["NumCPUs"])
        assert memory_mb(job["MinMemoryNode"]) == want.mem_mb, (rule, job["MinMemoryNode"])
        assert job["TimeLimit"] == f"{want.runtime // 60:02d}:{want.runtime % 60:02d}:00", (
            rule,
            job["TimeLimit"],
        )
        if want.gpus:
            assert job.get("TresPerJob") == f"gres:gpu:{want.gpus}", (rule, job)
        else:
            assert "gpu" not in job.get("TresPerJob", ""), (rule, job)
    print("resources per rule (NumCPUs, MinMemoryNode, TresPerJob):", seen)
    assert per_rule == {r: n for r, n in counts.items() if r not in ("all", "total")}
    # The tiny workflow has no feature combination, so combine_store does not run here;
    # its request is the same JobRequest machinery checked for every other rule.
    not_in_tiny = {"combine_store"}
    assert set(per_rule) == set(RULE_REQUESTS) - not_in_tiny, "every rule must run through SLURM"
    assert any(RULE_REQUESTS[r].gpus for r in per_rule), "no GPU job ran"

    report = work / "results" / "reports" / "tiny"
    for name in ("summary.csv", "summary.md", "accuracy_vs_epsilon.png"):
        assert (report / name).stat().st_size > 0
    # every head run wrote its metrics
    assert len(list((work / "results" / "runs").rglob("metrics.json"))) == counts["fit_head"]


def test_failed_job_is_reported_and_rerun_completes_only_what_is_missing(slurm_cluster, slurm_run):
    work, _, xdg = slurm_run
    exps = yaml.safe_load((work / "experiments.yaml").read_text())
    tiny = exps["experiments"]["tiny"]
    # Same features as `tiny`; a DP-SGD expected batch larger than the training split
    # (N = 600, known only once the features exist) passes config validation but is
    # rejected when the head learns N, so exactly one job fails at run time.
    exps["experiments"]["broken"] = {
        **{k: tiny[k] for k in ("dataset", "backbone", "image_size", "accountant")},
        "epsilons": [1],
        "delta": 1.0e-4,
        "seeds": [0],
        "methods": {"dp_sgd": {"batch_size": 1000, "epochs": 1}},
        "baselines": {"nonprivate_ridge": tiny["baselines"]["nonprivate_ridge"]},
    }
    (work / "experiments.yaml").write_text(yaml.safe_dump(exps))

    failed = snakemake_slurm(work, xdg, timeout=600)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out[-4000:]
    assert job_counts(out) == {
        "fit_head": 2,
        "report_experiment": 1,
        "report_index": 1,
        "all": 1,
        "total": 5,
    }
    assert re.search(r"Error in rule fit_head", out), out[-4000:]
    assert "exceeds the 600 training examples" in out, out[-4000:]  # the job's log is shown
    # ... and its traceback shows that the SLURM job ran this checkout's code (sbatch
    # --export=ALL passes PYTHONPATH and PATH on to the job)
    assert str(ROOT / "pipeline_lib" / "runner.py") in out, out[-4000:]
    jobs = {i: slurm_job(i) for i in SUBMITTED.findall(out)}
    states = {job["JobState"]: rule_of(job) for job in jobs.values()}
    assert states == {"FAILED": "fit_head", "COMPLETED": "fit_head"}, states
    (failed_id,) = [i for i, job in jobs.items() if job["JobState"] == "FAILED"]
    assert "broken_" in jobs[failed_id]["Comment"] and "dp_sgd" in jobs[failed_id]["Comment"]
    assert f"SLURM-job '{failed_id}' failed" in out  # snakemake names the SLURM job
    runs = (
        work / "results" / "runs" / "broken" / "fashion_mnist_tiny" / "efficientnet_lite0" / "32px"
    )
    ridge = runs / "nonprivate_ridge" / "nonprivate" / "seed0" / "metrics.json"
    assert ridge.exists()  # keep-going: the independent job still finished
    assert not list((runs / "dp_sgd").rglob("metrics.json"))
    assert not (work / "results" / "reports" / "broken").exists()
    ridge_mtime = ridge.stat().st_mtime_ns

    exps["experiments"]["broken"]["methods"]["dp_sgd"]["batch_size"] = 128  # the fix
    (work / "experiments.yaml").write_text(yaml.safe_dump(exps))
    rerun = snakemake_slurm(work, xdg, timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-6000:]
    # only the failed head and the reports that waited for it
    assert job_counts(out) == {
        "fit_head": 1,
        "report_experiment": 1,
        "report_index": 1,
        "all": 1,
        "total": 4,
    }
    ids = SUBMITTED.findall(out)
    rules = sorted(rule_of(slurm_job(i)) for i in ids)
    assert rules == ["fit_head", "report_experiment", "report_index"]
    assert all(slurm_job(i)["JobState"] == "COMPLETED" for i in ids)
    assert ridge.stat().st_mtime_ns == ridge_mtime
    assert (work / "results" / "reports" / "broken" / "summary.csv").stat().st_size > 0
