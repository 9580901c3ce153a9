"""SGLang launch commands, GPU checks, and the server-process lifecycle (readiness, failures, teardown)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.config import SGLangConfig
from megatron_opd.rollout.sglang.launcher import (
    ServerCommand,
    ServerProcesses,
    check_gpus,
    find_free_ports,
    port_is_free,
    sglang_server_commands,
)


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_sglang_commands() -> None:
    cfg = SGLangConfig(num_servers=3, tp_size=2, dp_size=2, base_gpu_id=1, mem_fraction_static=0.55, base_port=31000)
    cfg.extra_args = ["--enable-memory-saver"]
    cmds = sglang_server_commands(cfg, "/models/qwen3", seed=5, python="py")
    assert [c.command[:3] for c in cmds] == [["py", "-m", "sglang.launch_server"]] * 3
    assert [flag(c.command, "--base-gpu-id") for c in cmds] == ["1", "5", "9"]
    assert [flag(c.command, "--random-seed") for c in cmds] == ["5", "6", "7"]
    ports = [int(flag(c.command, p)) for c in cmds for p in ("--port", "--nccl-port")]
    assert len(set(ports)) == 6 and all(port_is_free("127.0.0.1", p) for p in ports)
    assert all(int(flag(c.command, "--port")) >= 31000 + 10 * i for i, c in enumerate(cmds))  # spaced apart
    for c in cmds:
        assert flag(c.command, "--model-path") == "/models/qwen3" and flag(c.command, "--tp-size") == "2"
        assert flag(c.command, "--dp-size") == "2" and flag(c.command, "--mem-fraction-static") == "0.55"
        assert c.url == f"http://127.0.0.1:{flag(c.command, '--port')}" and c.command[-1] == "--enable-memory-saver"
    saver = sglang_server_commands(cfg, "/models/qwen3", seed=5, python="py", memory_saver=True)
    assert [c.command.count("--enable-memory-saver") for c in saver] == [1, 1, 1]  # already in extra_args
    cfg.extra_args = []
    assert all(
        c.command[-1] == "--enable-memory-saver" for c in sglang_server_commands(cfg, "/m", seed=5, memory_saver=True)
    )
    assert all("--enable-memory-saver" not in c.command for c in sglang_server_commands(cfg, "/m", seed=5))
    # log-probs at the sampling temperature (sampler.py reads SGLANG_RETURN_ORIGINAL_LOGPROB), seeds only if asked
    assert all(c.env == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "false"} for c in cmds)
    assert all("--enable-deterministic-inference" not in c.command for c in cmds)
    cfg.deterministic_inference = True
    assert all(
        c.command.count("--enable-deterministic-inference") == 1 for c in sglang_server_commands(cfg, "/m", seed=5)
    )
    moved = cmds[1].with_model_path("/ckpt/v3")  # a restart on the latest weights: only the model changes
    assert (
        flag(moved.command, "--model-path") == "/ckpt/v3" and flag(cmds[1].command, "--model-path") == "/models/qwen3"
    )
    assert [a for a in moved.command if a != "/ckpt/v3"] == [a for a in cmds[1].command if a != "/models/qwen3"]
    with pytest.raises(RolloutError, match="no --model-path to replace"):
        ServerCommand("http://h:1", ["serve", "--model", "m"]).with_model_path("x")


def test_gpu_check_names_the_fix() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("machine has GPUs")
    with pytest.raises(RolloutError, match=r"needs 2 GPUs, this node has 0.*rollout.engine=hf"):
        check_gpus(SGLangConfig(num_servers=2))


def test_free_ports() -> None:
    a, b = find_free_ports("127.0.0.1", 0, 2)
    assert a != b and port_is_free("127.0.0.1", a)


def test_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    cmd = ServerCommand("http://127.0.0.1:9", [sys.executable, "-c", "print('model not found'); raise SystemExit(3)"])
    procs = ServerProcesses([cmd], tmp_path)
    with pytest.raises(RolloutError, match=r"(?s)exited with code 3 while starting.*model not found"):
        procs.start(timeout_s=30)


def test_server_that_never_gets_healthy_is_stopped(tmp_path: Path) -> None:
    port = find_free_ports("127.0.0.1", 0, 1)[0]
    cmd = ServerCommand(
        f"http://127.0.0.1:{port}", [sys.executable, "-c", "import time; print('loading'); time.sleep(60)"]
    )
    procs = ServerProcesses([cmd], tmp_path)
    with pytest.raises(RolloutError, match=r"(?s)not healthy after 1 s.*startup_timeout_s.*loading"):
        procs.start(timeout_s=1)
    assert procs.procs[0].poll() is not None  # torn down
