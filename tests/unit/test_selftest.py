"""``opd selftest``: on CPU every check that a CPU can run passes (kernels against float64, tiny
Qwen3 / Qwen3-MoE Megatron models against transformers, packed = unpacked, the gloo weight broadcast),
the rest are skipped with their reason; a failing check makes the exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_opd.selftest.report import Skip, run_check, table


def selftest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "selftest", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cpu_selftest_passes(tmp_path: Path) -> None:
    out = tmp_path / "selftest.json"
    run = selftest("--device", "cpu", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in record["checks"]}
    assert record["failed"] == 0 and "FAIL" not in status.values()
    for name in (
        "environment/torch version",
        "kernels/fused LM head",
        "kernels/support divergence",
        "models/qwen3 local: logits = transformers",
        "models/qwen3 local: packed fwd+bwd",
        "models/qwen3_moe local: logits = transformers",
        "models/qwen3_moe local: packed fwd+bwd",
        "weight sync/round trip",
    ):
        assert status[name] == "PASS", name
    assert sum(n.startswith("kernels/token_logprobs") and s == "PASS" for n, s in status.items()) == 6
    assert status["models/te spec"] == status["environment/triton"] == "SKIP"
    assert status["trainer/offload round trip bf16"] == status["trainer/offload round trip fp32"] == "SKIP"
    assert record["environment"]["packages"]["megatron-core"]
    assert "passed, 0 failed" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_missing_cuda_fails_with_exit_code_1(tmp_path: Path) -> None:
    out = tmp_path / "selftest.json"
    run = selftest("--device", "cuda", "--json", str(out), "--only", "environment")
    assert run.returncode == 1, run.stdout + run.stderr
    device = {c["name"]: c for c in json.loads(out.read_text())["checks"]}["environment/device"]
    assert device["status"] == "FAIL" and "torch.cuda.is_available() is False" in device["detail"]


def test_outcomes_and_table() -> None:
    def skipped() -> tuple[str, dict]:
        raise Skip("needs 2 GPUs")

    def failed() -> tuple[str, dict]:
        raise AssertionError("error 3e-1 > 1e-4")

    outcomes = [run_check("a", lambda: ("fine", {"x": 1})), run_check("b", skipped), run_check("c", failed)]
    assert [(o.status, o.detail) for o in outcomes][:2] == [("PASS", "fine"), ("SKIP", "needs 2 GPUs")]
    assert outcomes[2].status == "FAIL" and outcomes[2].detail.startswith("AssertionError: error 3e-1 > 1e-4")
    assert "traceback" in outcomes[2].data
    rows = list(table(outcomes))
    assert rows[0].split()[:2] == ["PASS", "a"] and rows[-1] == "1 passed, 1 failed, 1 skipped"


def _offload_check_on_cpu(root: str) -> tuple[str, str]:
    """The offload check's flow on CPU (the layer answers CUDA memory queries with 0 and offloading is a
    no-op without CUDA): setup, a step, the state snapshot and comparison, a second step."""
    from megatron_opd.selftest import models, offload
    from megatron_opd.selftest.report import run_check

    tiny = models.TinyModels(torch.device("cpu"), Path(root))
    device_like_cuda = types.SimpleNamespace(type="cuda")
    outcome = run_check("offload", offload.round_trip(lambda: tiny.hf_dir("dense"), "bf16", device_like_cuda))
    return outcome.status, outcome.detail


@pytest.mark.slow
def test_offload_check_runs_its_steps(tmp_path: Path) -> None:
    from megatron_opd.platform.spawn import spawn_world

    ((status, detail),) = spawn_world(_offload_check_on_cpu, 1, str(tmp_path))
    assert status == "PASS", detail
    assert "state bit-identical, trains on" in detail
