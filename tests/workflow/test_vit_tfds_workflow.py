"""End to end: a tiny ViT checkpoint in big_vision format + a mocked TFDS dataset.

The checkpoint is written by the test in exactly the published `.npz` layout
(flat "/"-joined parameter names) and named in config.yaml under `backbones:`;
the dataset is `source: tfds` (cifar10), served by `tfds.testing.mock_data` in
every process Snakemake starts (tests/workflow/tfds_mock/sitecustomize.py).
Extraction runs as 2 shard jobs per store.
"""

import hashlib
import json

import pytest
import yaml

from tests.snakemake_cmd import WORKFLOW_TESTS, run_snakemake, snakemake_env

pytestmark = pytest.mark.slow
N = 64  # mocked examples per split


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    from pipeline_lib.backbones import vit
    from pipeline_lib.backbones.checkpoints import save_npz

    work = tmp_path_factory.mktemp("vit_wf")
    ckpt = work / "vit_tiny_4.npz"
    save_npz(ckpt, vit.random_variables(vit.get_config("tiny/4", image_size=32))["params"])
    config = {
        "results_dir": "results",
        "experiments_file": "experiments.yaml",
        "checkpoint_cache_dir": str(work / "cache"),
        "datasets": {"cifar_mock": {"source": "tfds", "tfds_name": "cifar10"}},
        "backbones": {
            "vit_tiny": {
                "model": "vit",
                "variant": "tiny/4",
                "checkpoint": str(ckpt),
                "image_size": 32,
            }
        },
        "extraction": {"batch_size": 16, "chunk_rows": 16, "shards": 2},
    }
    experiments = {
        "experiments": {
            "vit_cifar": {
                "dataset": "cifar_mock",
                "backbone": "vit_tiny",
                "image_size": 32,
                "epsilons": [2],
                "delta": 1.0e-3,
                "seeds": [0],
                "methods": {"dp_ls": {}, "dp_sgd": {"batch_size": 16, "epochs": 1}},
                "baselines": {"nonprivate_ridge": {}},
            }
        }
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    (work / "experiments.yaml").write_text(yaml.safe_dump(experiments))
    # every process snakemake starts imports tfds_mock/sitecustomize.py, which mocks TFDS
    env = snakemake_env(WORKFLOW_TESTS / "tfds_mock", DP_TEST_MOCK_TFDS=str(N))
    proc = run_snakemake(work, env=env)
    return work, ckpt, proc.stdout + proc.stderr


def test_store_records_the_vit_checkpoint_and_tfds_source(vit_run):
    from pipeline_lib.features.store import FeatureStore

    work, ckpt, out = vit_run
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for split in ("train", "test"):
        store = FeatureStore(work / f"results/features/cifar_mock/vit_tiny/32px/{split}.zarr")
        attrs = store.attrs
        assert store.num_examples == N and store.num_classes == 10
        assert store.feature_dim == 64  # the tiny variant's width (token pooling, no pre_logits)
        assert attrs["backbone"] == "vit_tiny" and attrs["checkpoint_sha256"] == sha
        assert attrs["dataset"] == "cifar_mock" and "tfds:cifar10" in attrs["source"]
        stats = attrs["extraction_stats"]
        assert stats["num_shards"] == 2 and stats["images_extracted"] == N
        assert stats["flop_per_second_per_job"] > 0
    assert "shard 1 of 2" in out or "shard-1-of-2" in out


def test_heads_and_reports_complete(vit_run):
    work, _, _ = vit_run
    runs = [json.loads(p.read_text()) for p in (work / "results/runs").rglob("metrics.json")]
    assert sorted(r["method"] for r in runs) == ["dp_ls", "dp_sgd", "nonprivate_ridge"]
    for r in runs:
        assert r["backbone"] == "vit_tiny" and r["dataset"] == "cifar_mock"
        if r["private"]:
            assert r["spent_epsilon"] <= 2 and r["num_train"] == N
    assert (work / "results/reports/vit_cifar/accuracy_vs_epsilon.png").stat().st_size > 0
    assert "cifar_mock" in (work / "results/reports/ledger.md").read_text()
