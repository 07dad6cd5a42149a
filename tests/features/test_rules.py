"""The extraction rules: init_store -> S x extract_shard -> finalize_store, through Snakemake.

The stores of the shared tiny workflow (tests/conftest.py `tiny_workflow`, 2 shards per
store) are checked against the library's; the tests that change a workflow work on their own.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline_lib import experiments as xp
from pipeline_lib.features import store as fs
from tests.snakemake_cmd import (
    FMNIST,
    job_counts,
    run_snakemake,
    snakemake_cmd,
    snakemake_env,
    tiny_config,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FMNIST.exists(), reason="needs apt-get install dataset-fashion-mnist"),
]
TINY = "results/features/fashion_mnist_tiny/efficientnet_lite0/32px/{split}.zarr"
STORE = "results/features/fmnist/efficientnet_lite0/32px/{split}.zarr"


def _workdir(tmp_path: Path, *, train: int, test: int, **extraction) -> Path:
    work = tmp_path / "wf"
    work.mkdir()
    config = {
        "results_dir": "results",
        "experiments_file": "experiments.yaml",
        "datasets": {
            "fmnist": {
                "source": "fashion_mnist",
                "data_dir": str(FMNIST),
                "allow_network": False,
                "max_train_examples": train,
                "max_test_examples": test,
            }
        },
        "extraction": {"batch_size": 32, "chunk_rows": 64, **extraction},
    }
    experiments = {
        "experiments": {
            "tiny": {
                "dataset": "fmnist",
                "backbone": "efficientnet_lite0",
                "image_size": 32,
                "epsilons": [1],
                "delta": 1e-4,
                "seeds": [0],
                "methods": {"dp_ls": {"l2_clip_norm": 1.0}},
            }
        }
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    (work / "experiments.yaml").write_text(yaml.safe_dump(experiments))
    return work


def snakemake(work: Path, *args: str) -> str:
    proc = run_snakemake(work, "--rerun-incomplete", *args, timeout=900)
    return proc.stdout + proc.stderr


def test_dry_run_plans_one_job_per_shard(tmp_path):
    work = tiny_config(tmp_path)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["extraction"].update(shards=3, shards_per_dataset={"other": 7})
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    counts = job_counts(snakemake(work, "-n"))
    assert counts["init_store"] == 2 and counts["finalize_store"] == 2
    assert counts["extract_shard"] == 2 * 3  # 3 per store, train and test
    cfg["extraction"]["shards_per_dataset"] = {"fashion_mnist_tiny": 5}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert job_counts(snakemake(work, "-n"))["extract_shard"] == 2 * 5


def _library_store(path: Path, n: int, split: str = "train", *, key="fmnist", spec=None, **kw):
    from pipeline_lib.data import open_dataset
    from pipeline_lib.features.extract import extract_to_store

    # the same dataset entry the rules see, so the store attributes (dataset key) agree
    spec = spec or {"source": "fashion_mnist", "data_dir": str(FMNIST), f"max_{split}_examples": n}
    data = open_dataset(key, spec, split)
    assert data.num_examples == n
    extract_to_store(
        data,
        backbone_name="efficientnet_lite0",
        out_path=path,
        image_size=32,
        progress=False,
        **{"batch_size": 32, "chunk_rows": 64, **kw},
    )
    return path


def test_rules_build_the_library_store(tiny_workflow, tmp_path, assert_same_store):
    """The tiny workflow's test store, made by init_store + 2 extract_shard + finalize_store,
    is byte for byte the store that the library makes in one call."""
    cfg = yaml.safe_load((tiny_workflow / "config.yaml").read_text())
    ext = cfg["extraction"]
    assert ext["shards"] == 2 and ext["chunk_rows"] == 128  # 300 test rows: 3 chunks
    target = TINY.format(split="test")
    store = tiny_workflow / target
    library = _library_store(
        tmp_path / "lib" / "test.zarr",
        300,
        "test",
        key="fashion_mnist_tiny",
        spec=cfg["datasets"]["fashion_mnist_tiny"],
        batch_size=ext["batch_size"],
        chunk_rows=ext["chunk_rows"],
        dtype=ext["dtype"],
    )
    assert_same_store(store, library)
    assert not fs.work_dir(store).exists()  # job files went with the work dir
    stats = fs.FeatureStore(store).attrs["extraction_stats"]
    assert stats["num_shards"] == 2 and stats["images_extracted"] == 300
    assert [s["chunk_range"] for s in stats["shards"]] == [[0, 1], [1, 3]]
    logs = tiny_workflow / "results/logs/extract/fashion_mnist_tiny/efficientnet_lite0/32px"
    assert "img/s" in (logs / "test-shard-1-of-2.log").read_text()
    assert "Nothing to be done" in snakemake(tiny_workflow, "-n", target)


def test_killed_shard_job_resumes_under_snakemake(tmp_path, assert_same_store):
    n = 1024  # 16 chunks of 64 rows: killed after 3, the rest still to do
    work = _workdir(tmp_path, train=n, test=100, shards=1)
    target = STORE.format(split="train")
    store = work / target
    proc = subprocess.Popen(
        snakemake_cmd(work, "--rerun-incomplete", target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=snakemake_env(),
        start_new_session=True,  # its own process group: snakemake and its job
    )
    done = fs.work_dir(store) / "done"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if done.exists() and len(list(done.glob("chunk-*"))) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    total = fs.num_chunks(n, 64)
    finished = total - len(fs.pending_chunks(store))
    assert 3 <= finished < total and not store.exists()

    snakemake(work, "--unlock")
    snakemake(work, target)  # Snakemake reruns the incomplete shard job...
    stats = fs.FeatureStore(store).attrs["extraction_stats"]["shards"]
    shard = stats[0]
    assert shard["chunks_already_done"] >= finished  # ...which kept the finished chunks
    assert shard["chunks_done"] == total - shard["chunks_already_done"]
    assert_same_store(store, _library_store(tmp_path / "lib" / "train.zarr", n))


def test_patterns_and_paths_agree():
    config = {"results_dir": "R", "extraction": {"shards": 2, "shards_per_dataset": {"big": 4}}}
    assert xp.extraction_shards(config, "small") == 2 and xp.extraction_shards(config, "big") == 4
    paths = xp.shard_done_paths(config, "big", "vit", 224, "train")
    assert paths == [
        f"R/features/big/vit/224px/train.zarr.inprogress/jobs/shard-{k}-of-4.json" for k in range(4)
    ]
    assert xp.extraction_patterns(config)["store"] == xp.feature_path(
        "R", "{dataset}", "{backbone}", "{image_size}", "{split}"
    )
    assert xp.extraction_options({})["shards"] == 1  # every key has a default
    with pytest.raises(xp.ConfigError, match="extraction.shards=0"):
        xp.extraction_options({"extraction": {"shards": 0}})
    assert xp.backbone_options({}, "vit") == {}
    assert xp.backbone_options(
        {"backbones": {"vit": {"checkpoint": "x.npz"}}, "checkpoint_cache_dir": "/c"}, "vit"
    ) == {"spec": {"checkpoint": "x.npz"}, "cache_dir": "/c"}


def test_damaged_chunk_stops_the_workflow_and_repair_reruns_only_what_failed(
    tiny_workflow_copy, tmp_path
):
    """The issue's report: a deleted chunk file gave a 100% done run with zeros for rows.

    On a copy of the finished tiny workflow, a new experiment needs new statistics from the
    train store (600 rows, chunks of 128), one of whose chunk files is gone."""
    work = tiny_workflow_copy
    train = work / TINY.format(split="train")
    clean = tmp_path / "clean.zarr"
    shutil.copytree(train, clean)
    (train / "features/c/2/0").unlink()
    exps = yaml.safe_load((work / "experiments.yaml").read_text())
    damaged = dict(exps["experiments"]["tiny"], epsilons=[1], seeds=[0])
    damaged["methods"] = {"dp_ls": {"l2_clip_norm": 2.0}}  # statistics the run has not made
    damaged.pop("baselines")
    (work / "experiments.yaml").write_text(yaml.safe_dump({"experiments": {"damaged": damaged}}))
    before = {p for p in (work / "results").rglob("*") if p.is_file()}

    proc = subprocess.run(
        snakemake_cmd(work, "--rerun-incomplete"),
        capture_output=True,
        text=True,
        timeout=900,
        env=snakemake_env(),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    new = {p for p in (work / "results").rglob("*") if p.is_file()} - before
    (log,) = [p for p in new if "compute_stats" in p.parts and p.suffix == ".log"]
    text = log.read_text()
    assert "chunk 2 (rows 256-383)" in text and "features/c/2/0: missing" in text
    repair = f"python -m pipeline_lib.features.verify --repair {TINY.format(split='train')}"
    assert repair in text, text[-2000:]
    assert not [p for p in new if p.suffix == ".npz"]  # no statistics, no head
    assert not (work / "results" / "runs" / "damaged").exists()

    cli = [sys.executable, "-m", "pipeline_lib.features.verify", "--repair", str(train)]
    fixed = subprocess.run(cli, capture_output=True, text=True, timeout=600, env=snakemake_env())
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "repaired chunks 2 (rows 256-383)" in fixed.stdout
    plan = job_counts(snakemake(work, "-n"))
    assert not {"init_store", "extract_shard", "finalize_store"} & set(plan), plan
    assert plan["compute_stats"] == 1 and plan["fit_head"] == 1, out[-2000:]
    snakemake(work)
    assert list((work / "results" / "runs" / "damaged").rglob("metrics.json"))
    _assert_same(train, clean)


def _assert_same(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_combination_rule_builds_a_verified_store_that_heads_read(tmp_path):
    """A combination of Lite0 and Lite0 with flip TTA, through the rules, into a head run."""
    import json

    import numpy as np

    work = _workdir(tmp_path, train=200, test=100)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["backbones"] = {
        "lite0_flip": {"model": "efficientnet_lite", "variant": "lite0", "tta": "flip"},
        "both": {
            "model": "combine",
            "sources": [{"backbone": "efficientnet_lite0"}, {"backbone": "lite0_flip"}],
            "source_normalization": "l2",
        },
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    exps = yaml.safe_load((work / "experiments.yaml").read_text())
    exps["experiments"]["tiny"]["backbone"] = "both"
    exps["experiments"]["tiny"]["baselines"] = {
        "nonprivate_logistic": {"l2_clip_norm": 1.0, "feature_transform": "normalize"}
    }
    (work / "experiments.yaml").write_text(yaml.safe_dump(exps))
    counts = job_counts(snakemake(work, "-n"))
    assert counts["combine_store"] == 2  # train and test
    assert counts["init_store"] == counts["finalize_store"] == 4  # 2 sources x 2 splits

    run = "results/runs/tiny/fmnist/both/32px/nonprivate_logistic/nonprivate/seed0"
    snakemake(work, f"{run}/metrics.json")
    feats = "results/features/fmnist/{}/32px/train.zarr"
    combined = fs.FeatureStore(work / feats.format("both"))
    parts = [fs.FeatureStore(work / feats.format(b)) for b in ("efficientnet_lite0", "lite0_flip")]
    x = combined.read_all()[0]
    for k, part in enumerate(parts):
        y = part.read_all()[0]
        np.testing.assert_allclose(
            x[:, 1280 * k : 1280 * (k + 1)], y / np.linalg.norm(y, axis=1, keepdims=True),
            rtol=1e-6,
        )  # fmt: skip
    assert parts[1].attrs["tta"] == "flip"
    metrics = json.loads((work / run / "metrics.json").read_text())
    provenance = metrics["features"]
    assert provenance["backbone"] == "both" and provenance["source_normalization"] == "l2"
    assert [s["backbone"] for s in provenance["sources"]] == ["efficientnet_lite0", "lite0_flip"]
    assert provenance["sources"][1]["tta"] == "flip"
    assert not fs.work_dir(work / feats.format("both")).exists()
    assert "Nothing to be done" in snakemake(work, "-n", f"{run}/metrics.json")


def test_lite1_and_lite2_at_their_native_sizes_are_planned(tmp_path):
    """Built-in Lite1@240 and Lite2@260 need no config entry; their stores are planned."""
    work = _workdir(tmp_path, train=64, test=64)
    exps = yaml.safe_load((work / "experiments.yaml").read_text())
    tiny = exps["experiments"].pop("tiny")
    for name, size in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        exps["experiments"][name] = dict(tiny, backbone=name, image_size=size)
    (work / "experiments.yaml").write_text(yaml.safe_dump(exps))
    out = snakemake(work, "-n")
    assert job_counts(out)["extract_shard"] == 4  # 2 backbones x 2 splits
    for store in ("efficientnet_lite1/240px/train.zarr", "efficientnet_lite2/260px/test.zarr"):
        assert f"results/features/fmnist/{store}" in out
