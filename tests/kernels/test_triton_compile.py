"""Every config of the Triton kernels' autotune space compiles for Hopper (sm_90) — checked without a GPU through
Triton's bundled ptxas: no register spills, registers that let the config launch, and 16-byte global loads (stores,
for the gradient) in the streaming passes, as memory-bound code on Hopper needs. The interpreter tests cannot see
any of this (nor, e.g., a non-constexpr global read inside a kernel, which only the compiler rejects)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from megatron_opd.kernels import triton_backend
from tests.kernels.compile_sm90 import VARIANTS

HERE = Path(__file__).parent
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
REGISTERS = 64 * 1024  # per SM on Hopper


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton wheel ships no ptxas")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_config_compiles_for_sm90_without_spills(variant: str) -> None:
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "compile_sm90.py"), variant], capture_output=True, text=True, env=env, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(infos) >= len(triton_backend.TILES), proc.stdout  # every tile (top-k: those holding whole groups)
    for info in infos:
        assert info["local_bytes"] == 0, info
        assert info["regs"] * 32 * info["num_warps"] <= REGISTERS, info  # the config can launch
        assert "ld.global.v4.b32" in info["loads"], info  # 16-byte loads: 8 bf16 / 4 fp32 logits
        if variant.startswith("grad"):
            assert "st.global.v4.b32" in info["stores"], info  # 16-byte stores: 8 bf16 / 4 fp32 gradients
