"""SGLang servers launched over a Ray cluster of two nodes: ``ray.cluster_utils.Cluster`` on this
machine (a head and one added node, each with its own node id and one advertised GPU), one server per
node through the per-node actors. The servers are ``opd serve`` processes standing in for SGLang
(``sglang_standin``: the launcher's own ``sglang.launch_server`` command lines)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from megatron_opd.config.errors import ConfigError
from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.config import SGLangConfig
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.sglang.client import SGLangEngine
from megatron_opd.rollout.sglang.cluster import ClusterServers, check_cluster_launch, gpu_nodes, launch_servers
from megatron_opd.rollout.sglang.launcher import find_free_ports, place_servers
from tests.rollout.sglang_standin import standin_python
from tests.rollout.test_sglang_client import PROMPTS, SP, config, same

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """A Ray cluster of two nodes with one GPU each (advertised only: the servers run on CPU)."""
    if ray.is_initialized():
        ray.shutdown()  # this process drives one cluster at a time: this one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="warning")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def gone(pids: list[int], timeout_s: float = 60.0) -> bool:
    """Every process of ``pids`` has exited (or is a zombie) within ``timeout_s``."""
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=timeout_s)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive if p.is_running())


def test_servers_on_two_nodes_generate_sync_restart_on_their_node_and_stop(
    two_nodes: Cluster, tol: float, dense_dir: Path, dense_dir_b: Path, tmp_path: Path
) -> None:
    cfg = config([])
    s = cfg.sglang
    s.num_servers, s.deterministic_inference = 2, True
    s.startup_timeout_s, s.log_dir, s.weight_sync_dir = 300.0, str(tmp_path / "logs"), str(tmp_path / "sync")
    s.base_port = find_free_ports("127.0.0.1", 0, 1)[0]
    head, worker = two_nodes.head_node.node_id, two_nodes.list_all_nodes()[1].node_id
    nodes = gpu_nodes()
    assert [(n.node_id, n.gpus) for n in nodes] == [(head, 1), (worker, 1)]  # the driver's node first
    placements = place_servers(s, [n.gpus for n in nodes])
    assert [(p.index, p.node, p.base_gpu_id) for p in placements] == [(0, 0, 0), (1, 1, 0)]
    check_cluster_launch(s)

    servers = ClusterServers(s, str(dense_dir), placements, nodes, seed=cfg.seed, python=standin_python(tmp_path))
    engine = SGLangEngine(cfg, str(dense_dir), processes=servers.start(s.startup_timeout_s))
    pids = [servers.pid(i) for i in range(2)]
    actors = list(servers.hosts.values())
    try:
        assert servers.node_ids == [head, worker]
        assert [ray.get(a.node_id.remote()) for a in actors] == [head, worker]  # one actor pinned to each node
        actor_pids = [psutil.Process(p).ppid() for p in pids]  # each server is a child of its node's actor
        assert actor_pids[0] != actor_pids[1] and all(
            "NodeServers" in " ".join(psutil.Process(a).cmdline()) for a in actor_pids
        )
        # the loopback host became each node's Ray address; names (logs) are the global ones
        assert [urlsplit(u).hostname for u in servers.urls] == [n.address for n in nodes]
        assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["sglang0.log", "sglang1.log"]

        same(engine.generate(PROMPTS, SP), HFEngine(dense_dir, seed=0).generate(PROMPTS, SP), tol)
        assert all(sv.completed for sv in engine.servers)  # both nodes served

        engine.release_memory()  # a colocated step: memory released after the rollout, weights back for the sync,
        engine.resume_memory(("weights",))  # disk sync through the shared directory, the rest before the rollout
        engine.update_weights(HFCheckpointReader(dense_dir_b).items())
        engine.resume_memory()
        want_b = HFEngine(dense_dir_b, seed=0).generate(PROMPTS, SP)
        same(engine.generate(PROMPTS, SP), want_b, tol)

        url = servers.urls[1]
        servers.kill(1)
        same(engine.generate(PROMPTS, SP), want_b, tol)  # server 0 serves while server 1 restarts
        engine.wait_for_restarts()
        victim = engine.servers[1]
        assert victim.up and victim.restarts == 1 and not victim.stale and servers.urls[1] == url == victim.url
        restarted = servers.pid(1)
        assert restarted != pids[1] and psutil.Process(restarted).ppid() == actor_pids[1]  # by node 2's actor
        alone = SGLangEngine(config([victim.url]), "unused")  # restarted on the latest weights
        same(alone.generate(PROMPTS, SP), want_b, tol)
    finally:
        engine.shutdown()
    assert gone([*pids, restarted])
    assert servers.hosts == {} and gone(actor_pids)
    assert list((tmp_path / "sync").iterdir()) == []


def host_actors() -> list[psutil.Process]:
    """The live ``NodeServers`` actor processes of the test's cluster (its nodes are this process's children)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "NodeServers" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def test_launch_decides_between_this_node_and_the_cluster(two_nodes: Cluster, tmp_path: Path) -> None:
    """One server fits on the driver's node: a subprocess here, checked against this node's GPUs (none
    on CPU). Two need the other node: the cluster settings are checked, then each node's actor checks
    its own GPUs and the actors are ended on failure. Three are more than the cluster has."""
    s = SGLangConfig(num_servers=1, startup_timeout_s=60.0, log_dir=str(tmp_path))
    launch = functools.partial(launch_servers, model_dir=str(tmp_path), seed=1, memory_saver=False)
    with pytest.raises(RolloutError, match=r"launching 1 SGLang server\(s\) .* needs 1 GPUs, this node has 0"):
        launch(s)
    s.num_servers = 2
    with pytest.raises(ConfigError, match=r"rollout.sglang.weight_sync_dir: unset"):
        launch(s)
    s.weight_sync_dir = str(tmp_path)
    with pytest.raises(RolloutError, match=r"launching 1 SGLang server\(s\) .* needs 1 GPUs, this node has 0"):
        launch(s)
    _, alive = psutil.wait_procs(host_actors(), timeout=60)
    assert not alive
    s.num_servers = 3
    with pytest.raises(RolloutError, match=r"needs 3 GPUs, the Ray cluster's GPU nodes have 2 \(\[1, 1\] per node\)"):
        launch(s)
