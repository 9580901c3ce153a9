"""Fixtures shared across test directories.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before anything
imports ``triton`` (megatron-core and transformers do, while test modules are collected): this root
conftest is imported first, so it is set here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# The directory configs/demo/cpu.yaml builds its assets into (relative to the repository root).
DEMO_ASSETS = REPO / ".cache" / "opd_demo"


@pytest.fixture(scope="session")
def demo_assets():
    """The CPU demo's assets, built once (about 1.5 minutes on 2 cores) where the demo config expects
    them, and reused by every test (and later runs) while the recipe is unchanged."""
    from megatron_opd.demo.build import build_demo_assets

    return build_demo_assets(DEMO_ASSETS)
