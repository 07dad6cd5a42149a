"""The tiny workflow through a live single-node SLURM (slurmctld + slurmd + munged on localhost).

The cluster comes from tools/slurm/local_cluster.sh; the snakemake command is the one that
README.md's "Running on a cluster" section gives for clusters without slurmdbd, read from the
README itself, plus --directory/--configfile for the tiny config. CI runs as root, after
tools/setup_env.sh has installed the Debian packages, so there this test must run; elsewhere
it skips unless it may start daemons (root or passwordless sudo) and the packages are present.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_TESTS = ROOT / "tests" / "workflow"
CLUSTER = ROOT / "tools" / "slurm" / "local_cluster.sh"
PROFILE = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
FMNIST = Path("/usr/share/datasets/fashion-mnist")
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
SUBMITTED = re.compile(r"Job [\w-]+ has been submitted with SLURM jobid (\d+)")  # group: uuid
pytestmark = pytest.mark.slow


def readme_command() -> list[str]:
    """The CI variant of the cluster command, exactly as README.md prints it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running on a cluster") :]
    section = section[: section.index("\n## ", 1)]
    lines = [
        line.strip()
        for line in section.splitlines()
        if line.strip().startswith("snakemake --workflow-profile profiles/slurm")
        and "slurm_partition=ci" in line
    ]
    assert len(lines) == 1, f"README must show exactly one CI cluster command, found {lines}"
    return shlex.split(lines[0])


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
    """Node size (CPUs, MB) for local_cluster.sh: room for two of the profile's biggest jobs."""
    threads = max(int(v) for v in PROFILE["set-threads"].values())
    mem_mb = max(int(r.get("mem_mb", 0)) for r in PROFILE["set-resources"].values())
    return {"SLURM_LOCAL_MIN_CPUS": str(2 * threads), "SLURM_LOCAL_MIN_MEM_MB": str(2 * mem_mb)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Start the cluster; always stop the daemons it started (by PID), whatever happens."""
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


def snakemake_slurm(workdir: Path, timeout: int) -> subprocess.CompletedProcess:
    cmd = readme_command()
    assert cmd[0] == "snakemake"
    cmd = [sys.executable, "-m", *cmd]
    cmd += ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (workdir / f"snakemake-{len(list(workdir.glob('snakemake-*.log')))}.log").write_text(
        proc.stdout + proc.stderr
    )
    return proc


def job_stats(text: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (printed before a real run too)."""
    lines = text[text.index("Job stats:") :].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict; finished jobs stay there for MinJobAge=3600 s."""
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
    """The executor labels each SLURM job with --comment rule_<name>[_wildcards_...]; a group
    job is labelled with its group (profiles/slurm: `heads`, the fit_head jobs)."""
    name = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
    return GROUP if name.startswith(GROUP) else name


GROUP = "heads"
GROUPED_RULES = {r for r, g in PROFILE["groups"].items() if g == GROUP}


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("wf-slurm")
    for name in ("config.yaml", "experiments.yaml"):
        shutil.copy(WORKFLOW_TESTS / name, work / name)
    proc = snakemake_slurm(work, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return work, out


def test_tiny_workflow_runs_through_slurm(cluster, slurm_run):
    work, out = slurm_run
    counts = job_stats(out)
    ids = SUBMITTED.findall(out)
    grouped = sum(counts.get(r, 0) for r in GROUPED_RULES)
    assert grouped == 20, counts  # 20 head runs
    assert f"{counts['total']} of {counts['total']} steps (100%) done" in out

    squeue = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    finished = dict(line.split("|") for line in squeue.split())
    jobcomp = (cluster / "log" / "jobcomp.txt").read_text()
    per_rule: dict[str, int] = {}
    for job_id in ids:
        assert finished.get(job_id) == "COMPLETED", (job_id, finished)
        assert re.search(rf"JobId={job_id} .*JobState=COMPLETED", jobcomp), job_id
        job = slurm_job(job_id)
        rule = rule_of(job)
        per_rule[rule] = per_rule.get(rule, 0) + 1
        # a group job runs its jobs one after another (head_slots): one fit_head's request
        want = PROFILE["set-resources"]["fit_head" if rule == GROUP else rule]
        threads = PROFILE["set-threads"]["fit_head" if rule == GROUP else rule]
        assert job["Partition"] == "ci"
        assert job["NumCPUs"] == str(threads), (rule, job["NumCPUs"])
        assert memory_mb(job["MinMemoryNode"]) == want["mem_mb"], (rule, job["MinMemoryNode"])
        if want.get("gpu"):
            assert job.get("TresPerJob") == f"gres:gpu:{want['gpu']}", (rule, job)
        else:
            assert "gpu" not in job.get("TresPerJob", ""), (rule, job)
    # every job outside the group (but the target rule `all`) was one sbatch submission; the
    # 20 head runs went in ceil(20 / 16) = 2 (group-components: 16 runs per SLURM job)
    singles = {r: n for r, n in counts.items() if r not in ("all", "total", *GROUPED_RULES)}
    assert {r: n for r, n in per_rule.items() if r != GROUP} == singles, (per_rule, counts)
    per_part = PROFILE["group-components"][GROUP]
    assert per_rule[GROUP] == -(-grouped // per_part), (per_rule, grouped)
    assert len(ids) == len(set(ids)) == sum(singles.values()) + per_rule[GROUP]
    assert any(PROFILE["set-resources"][r].get("gpu") for r in per_rule), "no GPU job ran"

    report = work / "results" / "reports" / "tiny"
    for name in ("summary.csv", "summary.md", "accuracy_vs_epsilon.png"):
        assert (report / name).stat().st_size > 0
    # every head run of every experiment (tiny and tiny_tuned) wrote its metrics
    assert len(list((work / "results" / "runs").rglob("metrics.json"))) == counts["fit_head"]


def test_failed_job_is_reported_and_rerun_completes_only_what_is_missing(cluster, slurm_run):
    work, _ = slurm_run
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

    failed = snakemake_slurm(work, timeout=600)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out[-4000:]
    assert job_stats(out) == {
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
    # both runs are in one group job, which fails as a whole
    jobs = {i: slurm_job(i) for i in SUBMITTED.findall(out)}
    states = {job["JobState"]: rule_of(job) for job in jobs.values()}
    assert states == {"FAILED": GROUP}, states
    (failed_id,) = jobs
    # snakemake names the group and the SLURM job's log
    assert f"Error in group {GROUP}" in out and f"/{failed_id}.log" in out, out[-4000:]
    runs = (
        work / "results" / "runs" / "broken" / "fashion_mnist_tiny" / "efficientnet_lite0" / "32px"
    )
    ridge = runs / "nonprivate_ridge" / "nonprivate" / "seed0" / "metrics.json"
    # Inside a group job a failure stops the jobs not yet started; the ridge run either ran
    # before it (and keep-incomplete keeps it: a finished run is never deleted) or never ran.
    ridge_done = ridge.exists()
    print("ridge finished before the failure:", ridge_done)
    assert not list((runs / "dp_sgd").rglob("metrics.json"))
    assert not (work / "results" / "reports" / "broken").exists()
    ridge_mtime = ridge.stat().st_mtime_ns if ridge_done else None

    exps["experiments"]["broken"]["methods"]["dp_sgd"]["batch_size"] = 128  # the fix
    (work / "experiments.yaml").write_text(yaml.safe_dump(exps))
    rerun = snakemake_slurm(work, timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-6000:]
    # only the failed head (and the ridge run if it never ran) and the reports that waited
    heads = 1 if ridge_done else 2
    assert job_stats(out) == {
        "fit_head": heads,
        "report_experiment": 1,
        "report_index": 1,
        "all": 1,
        "total": 3 + heads,
    }
    ids = SUBMITTED.findall(out)
    rules = sorted(rule_of(slurm_job(i)) for i in ids)
    assert rules == sorted([GROUP, "report_experiment", "report_index"])
    assert all(slurm_job(i)["JobState"] == "COMPLETED" for i in ids)
    if ridge_done:
        assert ridge.stat().st_mtime_ns == ridge_mtime
    assert (work / "results" / "reports" / "broken" / "summary.csv").stat().st_size > 0
