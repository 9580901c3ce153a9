"""SGLang launch commands, placement over nodes, GPU checks, and the server-process lifecycle (readiness, failures, teardown)."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from megatron_opd.config.errors import ConfigError
from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.config import SGLangConfig
from megatron_opd.rollout.sglang.cluster import check_cluster_launch, order_gpu_nodes
from megatron_opd.rollout.sglang.launcher import (
    ServerCommand,
    ServerProcesses,
    check_gpus,
    find_free_ports,
    place_servers,
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


def test_servers_placed_over_nodes() -> None:
    """Server i takes the global GPUs base_gpu_id + i*tp*dp ...; global GPU g is local GPU g % 8 of node g // 8."""
    where = [(p.index, p.node, p.base_gpu_id) for p in place_servers(SGLangConfig(num_servers=16), [8, 8])]
    assert where == [(g, g // 8, g % 8) for g in range(16)]
    cfg = SGLangConfig(num_servers=7, tp_size=2, base_gpu_id=2)
    assert [(p.node, p.base_gpu_id) for p in place_servers(cfg, [8, 8])] == [
        (0, 2), (0, 4), (0, 6), (1, 0), (1, 2), (1, 4), (1, 6)
    ]  # fmt: skip
    assert [(p.node, p.base_gpu_id) for p in place_servers(SGLangConfig(num_servers=3, tp_size=4), [4, 8])] == [
        (0, 0), (1, 0), (1, 4)
    ]  # fmt: skip
    # one node: the GPUs the single-node launch has always used
    assert [p.base_gpu_id for p in place_servers(cfg, [16])] == [2, 4, 6, 8, 10, 12, 14]


def test_placement_refuses_straddling_servers_and_too_few_gpus() -> None:
    with pytest.raises(
        RolloutError,
        match=r"server 2 would take the global GPUs 6..8, across nodes 0 and 1.*tp_size \* dp_size \(3\).*base_gpu_id",
    ):
        place_servers(SGLangConfig(num_servers=3, tp_size=3), [8, 8])
    with pytest.raises(RolloutError, match=r"server 0 would take .* 7..8.*base_gpu_id \(7\)"):
        place_servers(SGLangConfig(num_servers=1, dp_size=2, base_gpu_id=7), [8, 8])
    with pytest.raises(
        RolloutError, match=r"needs 17 GPUs, the Ray cluster's GPU nodes have 16 \(\[8, 8\] per node\).*num_servers"
    ):
        place_servers(SGLangConfig(num_servers=16, base_gpu_id=1), [8, 8])


def test_commands_of_one_node_keep_the_global_names_seeds_and_ports() -> None:
    """The servers of node 1 are those a single-node launch would make, on that node's local GPUs and address."""
    cfg = SGLangConfig(num_servers=4, tp_size=2, base_port=32000)
    on_node_1 = [p for p in place_servers(cfg, [4, 4]) if p.node == 1]
    cmds = sglang_server_commands(
        cfg, "/m", seed=5, python="py", placements=on_node_1, host="0.0.0.0", url_host="10.0.0.2"
    )
    assert [c.name for c in cmds] == ["sglang2", "sglang3"]
    assert [flag(c.command, "--random-seed") for c in cmds] == ["7", "8"]
    assert [flag(c.command, "--base-gpu-id") for c in cmds] == ["0", "2"]
    assert [flag(c.command, "--host") for c in cmds] == ["0.0.0.0"] * 2
    assert all(int(flag(c.command, "--port")) >= 32000 + 10 * i for i, c in zip((2, 3), cmds))
    assert [c.url for c in cmds] == [f"http://10.0.0.2:{flag(c.command, '--port')}" for c in cmds]
    one = sglang_server_commands(cfg, "/m", seed=5, python="py")
    assert [c.command[c.command.index("--base-gpu-id") + 1] for c in one] == ["0", "2", "4", "6"]


def test_gpu_check_of_a_node_counts_its_servers_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    cfg = SGLangConfig(num_servers=4, tp_size=2)
    on_node_1 = [p for p in place_servers(cfg, [4, 4]) if p.node == 1]
    with pytest.raises(
        RolloutError, match=r"launching 2 SGLang server\(s\) .* from GPU 0 needs 4 GPUs, this node has 3"
    ):
        check_gpus(cfg, on_node_1)
    check_gpus(cfg, on_node_1[:1])  # GPUs 0 and 1


def test_gpu_nodes_order_starts_with_the_drivers_node() -> None:
    def node(node_id: str, address: str, gpus: int, alive: bool = True) -> dict:
        return {
            "NodeID": node_id,
            "NodeManagerAddress": address,
            "Alive": alive,
            "Resources": {"CPU": 8.0, "GPU": gpus},
        }

    nodes = [node("c", "10.0.0.3", 8), node("a", "10.0.0.1", 8), node("d", "10.0.0.2", 8), node("e", "10.0.0.0", 0)]
    nodes += [
        node("f", "10.0.0.0", 8, alive=False),
        {"NodeID": "g", "NodeManagerAddress": "10.0.0.0", "Alive": True, "Resources": {}},
    ]
    assert [n.node_id for n in order_gpu_nodes(nodes, "d")] == ["d", "a", "c"]
    assert [(n.address, n.gpus) for n in order_gpu_nodes(nodes, "e")] == [
        ("10.0.0.1", 8),
        ("10.0.0.2", 8),
        ("10.0.0.3", 8),
    ]


def test_cluster_launch_refuses_what_only_one_node_can_honour() -> None:
    ok = SGLangConfig(weight_sync_dir="/shared/sync")
    check_cluster_launch(ok)
    check_cluster_launch(dataclasses.replace(ok, host="0.0.0.0"))
    check_cluster_launch(SGLangConfig(weight_sync="distributed"))
    with pytest.raises(ConfigError, match=r"rollout.sglang.host='10.0.0.5': names one machine.*0.0.0.0"):
        check_cluster_launch(dataclasses.replace(ok, host="10.0.0.5"))
    with pytest.raises(ConfigError, match=r"rollout.sglang.weight_sync_dir: unset.*filesystem every node sees"):
        check_cluster_launch(SGLangConfig())
    with pytest.raises(ConfigError, match=r"rollout.sglang.weight_sync_master_addr='127.0.0.1'"):
        check_cluster_launch(SGLangConfig(weight_sync="distributed", weight_sync_master_addr="127.0.0.1"))


def test_servers_on_this_nodes_upper_gpus_beside_a_ray_that_has_the_lower_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A node split between the trainer and the engine (asynchronous runs): Ray advertises GPUs 0-3
    (``ray start --num-gpus 4``), four servers take GPUs 4-7 of the same node. They are launched here, not
    placed over Ray's GPU count (which would find 4 GPUs where 8 are needed)."""
    import ray
    import torch

    from megatron_opd.rollout.sglang import cluster

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "driver"))
    monkeypatch.setattr(cluster, "gpu_nodes", lambda: [cluster.GPUNode("driver", "10.0.0.1", 4)])
    monkeypatch.setattr(ServerProcesses, "start", lambda self, timeout_s: self)
    s = SGLangConfig(num_servers=4, base_gpu_id=4, log_dir=str(tmp_path))
    servers = cluster.launch_servers(s, str(tmp_path), seed=0, memory_saver=False)
    assert isinstance(servers, ServerProcesses)
    assert [flag(c.command, "--base-gpu-id") for c in servers.commands] == ["4", "5", "6", "7"]
