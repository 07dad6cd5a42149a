"""The extraction benchmarks run (tiny model, seconds) and the GPU script parses."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_extract():
    spec = importlib.util.spec_from_file_location("bench_extract", ROOT / "benchmarks/extract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extract = _load_extract()


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_extract.sh")], check=True)


def test_extract_runs_a_tiny_vit_and_writes_json_lines(tmp_path):
    out = tmp_path / "results.jsonl"
    args = ["--models", "vit:tiny/4,vit:tiny/8", "--image-size", "32", "--batch", "2"]
    records = extract.main([*args, "--repeats", "1", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert (
        [r["model"] for r in lines] == ["vit:tiny/4", "vit:tiny/8"] == [r["model"] for r in records]
    )
    first = lines[0]
    assert first["batch"] == 2 and first["image_size"] == 32 and first["devices"] >= 1
    assert first["img_per_s_median"] > 0 and first["achieved_flops_per_s"] > 0
    # XLA's count and the analytic matmul count agree to within the norms and softmaxes.
    assert first["flops_per_image_analytic"] == extract.vit_analytic_flops(
        extract.vit.get_config("tiny/4", image_size=32), 32
    )
    ratio = first["flops_per_image_xla"] / first["flops_per_image_analytic"]
    assert 1.0 <= ratio < 1.15
    assert "max_abs_diff" not in lines[1]  # Different networks are not compared.
    assert "fraction_of_peak" not in first  # No peak FLOP/s for CPUs.


def test_vit_b16_analytic_flops_match_the_known_figure():
    flops = extract.vit_analytic_flops(extract.vit.get_config("B/16"), 224)
    assert 34.5e9 < flops < 36e9  # ~35 GFLOP per image at 224 px.


def test_peak_table_and_override(monkeypatch):
    monkeypatch.delenv("PEAK_BF16_TFLOPS", raising=False)
    assert extract.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert extract.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert extract.peak_flops("NVIDIA H200")[0] == 989e12
    assert extract.peak_flops("NVIDIA A100-SXM4-40GB")[0] == 312e12
    assert extract.peak_flops("cpu")[0] is None
    monkeypatch.setenv("PEAK_BF16_TFLOPS", "100")
    assert extract.peak_flops("NVIDIA H100 80GB HBM3") == (100e12, "env PEAK_BF16_TFLOPS")


@pytest.mark.slow
def test_data_parallel_over_several_host_devices(tmp_path):
    out = tmp_path / "r.jsonl"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/extract.py"), "--models", "vit:tiny/4"]
        + ["--image-size", "16", "--batch", "3", "--repeats", "1", "--out", str(out)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    record = json.loads(out.read_text())
    assert record["devices"] == 2
    assert record["batch"] == 4  # Rounded up to a multiple of the device count.
