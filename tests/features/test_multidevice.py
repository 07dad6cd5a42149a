"""Data parallelism over 4 (forced host) CPU devices, in a subprocess: same features as one
device to ~1e-5, a valid sharded store, and a clear error for an indivisible batch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline_lib.features import devices as dev

FMNIST = Path("/usr/share/datasets/fashion-mnist")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    from pipeline_lib.data import load_dataset
    from pipeline_lib.features import extract, store as fs

    out = {"devices": len(jax.local_devices())}
    root = Path(sys.argv[1])
    data = load_dataset("fashion_mnist", "test", max_examples=200)
    common = dict(backbone_name="efficientnet_lite0", image_size=32)
    single = extract.extract_to_store(data, out_path=root / "one.zarr", batch_size=16,
                                      chunk_rows=48, num_devices=1, progress=False, **common)
    settings = extract.ExtractionSettings(batch_size=16, chunk_rows=48)  # all 4 devices
    path = root / "four.zarr"
    extract.init_store(data, out_path=path, settings=settings, **common)
    shards = [extract.extract_shard(data, out_path=path, settings=settings, shard=k,
                                    num_shards=3, **common) for k in range(3)]
    extract.finalize_extraction(path, shards)
    a, ya = fs.FeatureStore(root / "one.zarr").read_all()
    b, yb = fs.FeatureStore(path).read_all()
    out["max_abs_diff"] = float(np.abs(a - b).max())
    out["max_abs"] = float(np.abs(a).max())
    out["labels_equal"] = bool((ya == yb).all())
    out["shard_devices"] = [s["num_devices"] for s in shards]
    out["flops_per_image"] = [single["flops_per_image"], shards[0]["flops_per_image"]]
    try:
        extract.extract_to_store(data, out_path=root / "bad.zarr", batch_size=30,
                                 chunk_rows=48, progress=False, **common)
    except ValueError as exc:
        out["error"] = str(exc)
    print(json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_four_cpu_devices_match_one(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["shard_devices"] == [4, 4, 4]
    assert out["labels_equal"]
    print(out)  # the measured difference, for the record
    assert out["max_abs_diff"] <= 1e-5 * max(1.0, out["max_abs"]), out
    one, four = out["flops_per_image"]
    assert one > 1e6 and abs(four - one) <= 1e-3 * one  # global FLOPs, not one device's share
    assert "batch_size=30 must be a positive multiple of the 4 local devices" in out["error"]
    assert "set it to 28 or 32" in out["error"]


def test_check_batch_size_message():
    dev.check_batch_size(32, 8)
    with pytest.raises(ValueError, match="set it to 8 or 16"):
        dev.check_batch_size(12, 8)
    with pytest.raises(ValueError, match="set it to 8, or set extraction.num_devices"):
        dev.check_batch_size(3, 8)


def test_mesh_device_count_checked():
    assert dev.data_parallel_mesh().devices.size >= 1
    with pytest.raises(ValueError, match="num_devices=99"):
        dev.data_parallel_mesh(99)


@pytest.mark.parametrize(
    "cost, expected",
    [
        (None, None),
        ({}, None),
        ([], None),
        ({"flops": 10.0, "bytes accessed": 3.0}, 10.0),
        ([{"flops": 10.0}, {"flops": 5.0}], 15.0),
        ([{"flops": float("nan")}], None),
        ([None, {"flops": 2}], 2.0),
    ],
)
def test_flops_from_cost_analysis_shapes(cost, expected):
    assert dev.flops_from_cost_analysis(cost) == expected


def test_throughput_summary():
    meter = dev.Throughput(flops_per_batch=100.0, batch_size=4, log_every_s=0)
    meter.update(4)
    meter.update(2)  # a padded last batch: 2 images, but a whole batch of FLOPs
    s = meter.summary()
    assert (s["images"], s["batches"], s["flops_per_image"]) == (6, 2, 25.0)
    assert s["images_per_second"] > 0 and s["flop_per_second"] > 0
    assert dev.Throughput(flops_per_batch=None, batch_size=4).summary()["flop_per_second"] is None
    json.dumps(s)
