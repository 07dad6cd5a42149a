"""Fixtures shared across test folders: the fault injector, the tiny workflow (run once per
session), how tests are spread over xdist workers, and one JAX compilation cache."""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.snakemake_cmd import FMNIST, copy_workflow, run_snakemake, tiny_config

FAULTS = ("delete", "truncate", "flip", "swap")

# --- one XLA compilation cache for the whole session --------------------------------------
# Many tests build the same jitted functions anew (every extraction jits its forward pass,
# every snakemake job is a fresh process), and identical programs compile to identical
# executables. JAX's persistent cache, keyed on the program and the compile options, lets the
# second build load the first one's executable instead of compiling again. The variables are
# inherited by xdist workers and by every subprocess (snakemake and its jobs). A directory set
# by the caller (JAX_COMPILATION_CACHE_DIR) is used as it is, and kept: reruns then start warm.
# Only programs that took JAX's default 1 s to compile are stored (the backbones' forward
# passes); a size limit turns on JAX's file lock, which makes the cache safe for concurrent
# processes (xdist workers, two snakemake jobs).
_CACHE_VARS = {}
if importlib.util.find_spec("filelock") is not None:
    _CACHE_VARS["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2**31)


def pytest_configure(config):
    # Workers run side by side (one more than there are cores): one BLAS thread each, set
    # before the workers and subprocesses start (pipeline_lib/threads.py says why).
    from pipeline_lib.threads import limit_blas_threads

    limit_blas_threads(1)
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the xdist controller, or a plain run
        cache = tempfile.mkdtemp(prefix="pytest-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        config._jax_cache_made = cache  # removed at the end of the session
    for name, value in _CACHE_VARS.items():
        os.environ.setdefault(name, value)
    if "jax" in sys.modules:  # too late for the environment: tell the imported JAX directly
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
    cache = getattr(config, "_jax_cache_made", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


# --- how the tests are spread over xdist workers (pytest -n 2 --dist loadgroup) ------------
# One work unit per test file, so that a module-scoped fixture is built once, except that the
# files in SHARED_FIXTURE_FILES form one unit: their tests share a session fixture (the tiny
# workflow), which would otherwise run once per worker. xdist's own `xdist_group` marks do not
# work with pytest 9.2 (xdist renames `item._nodeid`, which pytest 9.2 no longer reads), hence
# this scheduler. The longest units start first: the live SLURM test (mostly waiting on the
# cluster, so the other worker keeps busy meanwhile), then the tiny workflow.
SHARED_FIXTURE_FILES = {
    "tests/workflow/test_workflow.py": "tiny_workflow",
    "tests/features/test_rules.py": "tiny_workflow",
}
FIRST = ("tests/slurm/test_slurm_live.py", "tiny_workflow")  # work units, longest first


def _work_unit(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return SHARED_FIXTURE_FILES.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the collection order set below
    return FileUnits(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::")[0]
        if "tiny_workflow" in item.fixturenames and path not in SHARED_FIXTURE_FILES:
            raise pytest.UsageError(
                f"{item.nodeid} uses the tiny_workflow fixture: add {path} to "
                "SHARED_FIXTURE_FILES in tests/conftest.py, so that it runs on the same "
                "xdist worker as the fixture's other users"
            )
    rank = {path: i for i, path in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_work_unit(item.nodeid), len(FIRST)))  # stable


# --- the fault injector of the fault-injection tables (tests/features, tests/) --------------


def _inject(fault: str, target: Path, other: Path | None) -> None:
    """Damage `target` on disk: delete it, cut it in half, flip one byte, or replace it
    with `other` (the same file from another run)."""
    if fault == "delete":
        target.unlink()
    elif fault == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif fault == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif fault == "swap":
        shutil.copyfile(other, target)
    else:
        raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")


@pytest.fixture
def inject_fault():
    """The fault injector of the fault-injection tables (tests/features, tests/)."""
    return _inject


# --- the tiny workflow, run once per session -----------------------------------------------


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory):
    """The tiny workflow (tests/workflow/config.yaml and experiments.yaml: a few hundred
    Fashion-MNIST images, every rule), run once per session by snakemake; its output is in
    snakemake.out. Shared and read only: a test that writes there takes
    `tiny_workflow_copy` instead, and the session fails if anything under results/ changed."""
    if not FMNIST.exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    work = tiny_config(tmp_path_factory.mktemp("tiny_workflow"))
    proc = run_snakemake(work)
    (work / "snakemake.out").write_text(proc.stdout + proc.stderr)
    before = _tree_state(work / "results")
    yield work
    after = _tree_state(work / "results")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared tiny workflow's results: {changed}"


@pytest.fixture
def tiny_workflow_copy(tiny_workflow, tmp_path):
    """A private copy of the finished tiny workflow, for tests that change it."""
    return copy_workflow(tiny_workflow, tmp_path / "tiny_workflow")
