"""Feature-extraction throughput (img/s) and achieved FLOP/s of the backbones.

Usage (the default set takes a few minutes on 2 CPU cores):

  PYTHONPATH=. .venv/bin/python benchmarks/extract.py
  PYTHONPATH=. .venv/bin/python benchmarks/extract.py --models vit:B/16 --dtype bfloat16 \\
      --batch 256 --repeats 10          # on an accelerator (see benchmarks/gpu_extract.sh)

Models (``--models``, comma-separated):
  efficientnet_lite0:conv   Lite0, real weights, XLA grouped convs (the straightforward port)
  efficientnet_lite0:taps   Lite0, real weights, the fast CPU formulation (the CPU default)
  vit:<variant>             ViT with random-init weights, e.g. vit:B/16, vit:tiny/4

What is measured, per model: one jitted forward pass (``module.apply``, preprocessed
images in, features out) at a fixed batch shape. The first call (compile + run) is not
timed; then ``--repeats`` calls are timed one by one, and the median and best img/s are
reported; on CPU also a "cpu-normalised" rate, images per CPU-second of this process
times the number of cores, which estimates an idle machine's rate when other jobs share
the cores (as in benchmarks/RESULTS_backbone.md). With more than one device the batch
is split over all local devices (``jax.sharding``, data-parallel, parameters replicated).

FLOPs per image come from XLA: ``jit(apply).lower(...).compile().cost_analysis()['flops']``
of the forward at the batch shape, divided by the batch. For Lite0 the count is taken
from the plain "conv" formulation without sub-batching (XLA's cost analysis counts a loop
body once, and the fast formulation trades convolutions for elementwise work), so both
Lite0 rows use the same model FLOPs and "achieved FLOP/s" = model FLOPs x img/s. For ViT
an analytic count (2 x multiply-adds of the matmuls and attention) is reported alongside.

When both Lite0 formulations are run, the max |difference| of their features on the same
batch is reported. Results are appended as JSON lines to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipeline_lib.backbones import get_backbone, vit

DEFAULT_MODELS = "efficientnet_lite0:conv,efficientnet_lite0:taps,vit:Ti/16,vit:S/16,vit:B/16"

# Dense (no sparsity) bf16 peak FLOP/s per chip, matched by substring of device_kind, first
# match wins. Vendor data sheets; override with PEAK_BF16_TFLOPS.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6", 918.0),
)


def peak_flops(device_kind: str) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s of one device, where the figure came from)."""
    if os.environ.get("PEAK_BF16_TFLOPS"):
        return float(os.environ["PEAK_BF16_TFLOPS"]) * 1e12, "env PEAK_BF16_TFLOPS"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops * 1e12, f"table entry {key!r}"
    return None, "unknown device kind; set PEAK_BF16_TFLOPS"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def vit_analytic_flops(config: vit.ViTConfig, image_size: int) -> float:
    """2 x multiply-adds of one image's forward pass (matmuls, attention; no norms)."""
    g = image_size // config.patch_size
    tokens = g * g + (config.pool == "tok")
    d, p = config.width, config.patch_size
    per_block = tokens * (4 * d * d + 2 * d * config.mlp_dim) + 2 * tokens * tokens * d
    total = g * g * p * p * 3 * d + config.depth * per_block
    if config.representation_size:
        total += d * config.representation_size
    if config.num_classes:
        total += config.feature_dim * config.num_classes
    return 2.0 * total


def build(model: str, image_size: int, dtype: str):
    """(backbone-like module, variables, preprocess, flops_module, analytic flops or None)."""
    family, _, kind = model.partition(":")
    if family == "efficientnet_lite0":
        backbone = get_backbone("efficientnet_lite0", dtype=dtype, depthwise_impl=kind)
        variables, _ = backbone.load_variables()
        plain = backbone.module.clone(depthwise_impl="conv", chunk_pixels=None)
        return backbone.module, variables, backbone.preprocess, plain, None
    if family == "vit":
        config = vit.get_config(kind, image_size=image_size)
        module = vit.ViT(config, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        variables = vit.random_variables(config)
        analytic = vit_analytic_flops(config, image_size)
        return module, variables, vit.preprocess_images, module, analytic
    raise SystemExit(f"unknown model {model!r}; e.g. efficientnet_lite0:taps or vit:B/16")


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n float32 matmul on the default device, measured now: the
    reference for what the machine gives at this moment (shared machines vary)."""
    a = jnp.ones((n, n), jnp.float32)
    fn = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(fn(a, a))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(a, a))
        seconds.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(seconds)


def xla_flops(compiled) -> float | None:
    """'flops' of a compiled XLA executable's cost analysis (None if unavailable)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def run_model(model: str, args, mesh: Mesh, raw: np.ndarray) -> tuple[dict, np.ndarray]:
    module, variables, preprocess, flops_module, analytic = build(
        model, args.image_size, args.dtype
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
    variables = jax.device_put(variables, replicated)
    images = jax.device_put(preprocess(raw), batch_sharded)

    def forward(m):
        return jax.jit(
            lambda v, x: m.apply(v, x)["pre_logits"],
            in_shardings=(replicated, batch_sharded),
            out_shardings=batch_sharded,
        )

    start = time.perf_counter()
    fn = forward(module).lower(variables, images).compile()
    features = jax.block_until_ready(fn(variables, images))
    compile_s = time.perf_counter() - start
    if flops_module is module:
        flops_total = xla_flops(fn)
    else:
        flops_total = xla_flops(forward(flops_module).lower(variables, images).compile())
    seconds = []
    cpu_start = time.process_time()
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(variables, images))
        seconds.append(time.perf_counter() - start)
    cpu_s = time.process_time() - cpu_start
    batch = raw.shape[0]
    rate = batch / statistics.median(seconds)
    flops_per_image = flops_total / batch if flops_total else None
    device_kind = jax.devices()[0].device_kind
    peak, peak_source = peak_flops(device_kind)
    n_devices = mesh.devices.size
    record = {
        "model": model,
        "image_size": args.image_size,
        "batch": batch,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "img_per_s_median": rate,
        "img_per_s_best": batch / min(seconds),
        "compile_and_first_call_s": compile_s,
        "process_cpu_s_per_wall_s": cpu_s / sum(seconds),
        # Images per CPU-second of this process x cores: what an idle machine would give,
        # roughly (contention for caches and memory bandwidth still counts). CPU only.
        "img_per_s_cpu_normalised": (
            batch * args.repeats / cpu_s * os.cpu_count()
            if jax.default_backend() == "cpu"
            else None
        ),
        "flops_per_image_xla": flops_per_image,
        "flops_per_image_analytic": analytic,
        "flops_source": "XLA cost_analysis of the jitted forward at the batch shape"
        + (" (plain conv formulation, no sub-batching)" if flops_module is not module else ""),
        "achieved_flops_per_s": flops_per_image * rate if flops_per_image else None,
        "backend": jax.default_backend(),
        "device_kind": device_kind,
        "devices": n_devices,
    }
    if jax.default_backend() != "cpu" and peak and flops_per_image:
        record["peak_bf16_flops_per_s"] = peak * n_devices
        record["peak_source"] = peak_source
        record["fraction_of_peak"] = flops_per_image * rate / (peak * n_devices)
    return record, np.asarray(features)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated, see above")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="global batch (all devices)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after warm-up")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--out", default="benchmarks/extract_results.jsonl")
    parser.add_argument("--note", default="", help="free text stored with each record")
    args = parser.parse_args(argv)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    batch = -(-args.batch // len(devices)) * len(devices)  # divisible by the device count
    raw = np.random.default_rng(0).uniform(0, 255, (batch, args.image_size, args.image_size, 3))
    raw = raw.astype(np.float32)
    common = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "jax": jax.__version__,
        "load_average_start": os.getloadavg()[0],
        "matmul_2048_f32_flops_per_s": matmul_flops_per_s(),
        "note": args.note,
    }
    print(f"{common['date']}  {common['machine']}  jax {jax.__version__}  devices: {devices}")
    print(
        f"reference: 2048^3 float32 matmul at {common['matmul_2048_f32_flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s now; load average {common['load_average_start']:.2f}"
    )
    records, features = [], {}
    for model in args.models.split(","):
        record, features[model] = run_model(model, args, mesh, raw)
        family = model.partition(":")[0]
        for other, f in features.items():  # Other formulations of the same Lite0 network.
            if other != model and family.startswith("efficientnet") and other.startswith(family):
                record["max_abs_diff_vs"] = other
                record["max_abs_diff"] = float(np.max(np.abs(features[model] - f)))
                break
        record = {**common, **record, "load_average_end": os.getloadavg()[0]}
        records.append(record)
        gflops = (record["flops_per_image_xla"] or 0) / 1e9
        print(
            f"{model:26s} {args.image_size}px batch {batch}: "
            f"{record['img_per_s_median']:8.2f} img/s (best {record['img_per_s_best']:.2f}), "
            f"{gflops:7.2f} GFLOP/img, "
            f"{(record['achieved_flops_per_s'] or 0) / 1e9:8.1f} GFLOP/s"
            + (
                f", cpu-normalised {record['img_per_s_cpu_normalised']:.2f} img/s"
                if record["img_per_s_cpu_normalised"]
                else ""
            )
            + (
                f", {100 * record['fraction_of_peak']:.1f}% of peak"
                if "fraction_of_peak" in record
                else ""
            )
            + (
                f", max|diff| vs {record['max_abs_diff_vs']}: {record['max_abs_diff']:.2e}"
                if "max_abs_diff" in record
                else ""
            ),
            flush=True,
        )
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    return records


if __name__ == "__main__":
    main()
