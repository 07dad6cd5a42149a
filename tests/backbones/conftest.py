"""Shared fixtures: the real EfficientNet-Lite checkpoints, read once per session."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.backbones import checkpoint_path
from pipeline_lib.backbones.torch_legacy import load_legacy_state_dict


@pytest.fixture(scope="session")
def lite0_path() -> str:
    return checkpoint_path("efficientnet_lite0")


@pytest.fixture(scope="session")
def lite0_state_dict(lite0_path) -> dict[str, np.ndarray]:
    return load_legacy_state_dict(lite0_path)
