"""Rollout servers launched by the driver across the Ray cluster's GPU nodes.

:func:`launch_servers` decides where the ``rollout.sglang.num_servers`` servers go. Without a Ray
cluster, or when every server fits on the driver's node (the first of :func:`gpu_nodes`), they are
subprocesses of the driver (:class:`ServerProcesses`). Otherwise :func:`place_servers` spreads them
over the GPU nodes and :class:`ClusterServers` starts one :class:`NodeServers` Ray actor per node
used: pinned to its node (``NodeAffinitySchedulingStrategy(soft=False)``), no CPU and no GPU
reserved (the trainer's placement group holds them; with no GPU assigned Ray leaves the node's
``CUDA_VISIBLE_DEVICES`` as it is, ``ray/_private/utils.py: set_visible_accelerator_ids``), it runs
that node's servers as its subprocesses: ports found free on its node, bound to its node's address,
GPUs checked on its node, logs in its node's ``log_dir``. Names, seeds and ports stay those of the
global server index, so the servers are the same as on one node, only placed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from megatron_opd.config.errors import ConfigError
from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.config import SGLangConfig, is_loopback
from megatron_opd.rollout.sglang.launcher import (
    LaunchedServers,
    ServerPlacement,
    ServerProcesses,
    check_gpus,
    gpus_needed,
    node_gpus,
    place_servers,
    sglang_server_commands,
)

logger = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::")  # bind every interface
CALL_MARGIN_S = 60.0  # a call on a node's actor may take this much longer than the work it bounds


@dataclasses.dataclass(frozen=True)
class GPUNode:
    """A Ray node with GPUs: its id, its address (Ray's ``NodeManagerAddress``) and GPU count."""

    node_id: str
    address: str
    gpus: int


def order_gpu_nodes(nodes: Sequence[dict[str, Any]], driver_node_id: str) -> list[GPUNode]:
    """The alive nodes of ``ray.nodes()`` that have GPUs, in a stable order: the driver's node
    first (when it has GPUs), then the others by address and node id."""
    gpu = [
        GPUNode(n["NodeID"], n["NodeManagerAddress"], int(n["Resources"].get("GPU", 0)))
        for n in nodes
        if n.get("Alive") and int(n.get("Resources", {}).get("GPU", 0)) > 0
    ]
    return sorted(gpu, key=lambda n: (n.node_id != driver_node_id, n.address, n.node_id))


def gpu_nodes() -> list[GPUNode]:
    """The GPU nodes of the Ray cluster this process is connected to (:func:`order_gpu_nodes`)."""
    return order_gpu_nodes(ray.nodes(), ray.get_runtime_context().get_node_id())


def check_cluster_launch(cfg: SGLangConfig) -> None:
    """Settings a launch over several nodes cannot honour (ConfigError): a specific ``host`` (each
    server binds to its own node's address), disk weight sync without a ``weight_sync_dir`` (the
    default is a temporary directory of the driver's node), a loopback ``weight_sync_master_addr``."""
    if not is_loopback(cfg.host) and cfg.host not in WILDCARD_HOSTS:
        raise ConfigError(
            "rollout.sglang.host",
            cfg.host,
            "names one machine, but the servers are launched on several nodes and each binds to its own node's "
            "address.",
            "leave it at 127.0.0.1 (each node's Ray address) or set 0.0.0.0 (every interface of each node).",
        )
    if cfg.weight_sync == "disk" and not cfg.weight_sync_dir:
        raise ConfigError(
            "rollout.sglang.weight_sync_dir",
            None,
            "unset, so the weights would go to a temporary directory of the driver's node that the servers on the "
            "other nodes cannot read.",
            "set it to a directory on a filesystem every node sees, or use rollout.sglang.weight_sync=distributed.",
        )
    if cfg.weight_sync == "distributed" and cfg.weight_sync_master_addr and is_loopback(cfg.weight_sync_master_addr):
        raise ConfigError(
            "rollout.sglang.weight_sync_master_addr",
            cfg.weight_sync_master_addr,
            "a loopback address, but servers are launched on other nodes: they would look for the weight-update "
            "group's TCP store on their own node.",
            "leave it unset (the address of the student rank 0's node) or give an address every node reaches.",
        )


class NodeServers:
    """Ray actor on one node: the :class:`ServerProcesses` of the servers placed there (their
    indices here are local; the driver's :class:`ClusterServers` maps global ones to them)."""

    def __init__(
        self,
        cfg: SGLangConfig,
        model_dir: str,
        placements: list[ServerPlacement],
        *,
        seed: int,
        memory_saver: bool,
        python: str | None = None,
    ) -> None:
        """``python``: the interpreter that runs ``-m sglang.launch_server`` (default: this node's)."""
        self.cfg, self.model_dir, self.placements = cfg, model_dir, placements
        address = ray.util.get_node_ip_address()
        bind = cfg.host if cfg.host in WILDCARD_HOSTS else address
        commands = sglang_server_commands(
            cfg,
            model_dir,
            seed=seed,
            python=python or sys.executable,
            memory_saver=memory_saver,
            placements=placements,
            host=bind,
            url_host=address,
        )
        self.processes = ServerProcesses(commands, cfg.log_dir, cfg.health_timeout_s)

    def urls(self) -> list[str]:
        return self.processes.urls

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def check_gpus(self) -> None:
        check_gpus(self.cfg, self.placements)

    def start(self, timeout_s: float) -> None:
        if not Path(self.model_dir).is_dir():
            raise RolloutError(
                f"the model directory {self.model_dir} does not exist on node {ray.util.get_node_ip_address()}: "
                "servers launched on several nodes read it there. Fix: keep the models on a filesystem every "
                "node sees."
            )
        self.processes.start(timeout_s)

    def restart(self, i: int, timeout_s: float, model_path: str | None) -> None:
        self.processes.restart(i, timeout_s, model_path)

    def kill(self, i: int) -> None:
        self.processes.kill(i)

    def log_tail(self, i: int) -> str:
        return f"({self.processes.log_paths[i]} on {ray.util.get_node_ip_address()})\n{self.processes.log_tail(i)}"

    def pids(self) -> list[int]:
        """The server processes' ids (on this node)."""
        return [p.pid for p in self.processes.procs]

    def stop(self, grace_s: float) -> None:
        self.processes.stop(grace_s)


def _get(ref: Any, timeout_s: float) -> Any:
    """``ray.get`` of a call on a node's actor: an error raised there is raised here as itself
    (a RolloutError quoting the server's log), a dead actor or a timeout as a RolloutError."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        raise e.cause if isinstance(e.cause, Exception) else RolloutError(str(e)) from e
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        raise RolloutError(f"a rollout server host actor failed: {e}") from e


class ClusterServers:
    """The servers of ``placements`` on the GPU nodes ``nodes``, with the interface of
    :class:`ServerProcesses` (servers by global index); a context manager that stops them on exit."""

    def __init__(
        self,
        cfg: SGLangConfig,
        model_dir: str,
        placements: list[ServerPlacement],
        nodes: Sequence[GPUNode],
        *,
        seed: int,
        memory_saver: bool = False,
        python: str | None = None,
    ) -> None:
        """``python``: the interpreter (or a stand-in) that runs ``-m sglang.launch_server`` on every
        node (default: each node's actor's own)."""
        self.cfg, self.placements = cfg, placements
        self.hosts: dict[int, Any] = {}  # node position -> its NodeServers actor
        per_node: collections.Counter[int] = collections.Counter()
        self.local: list[int] = []  # global server index -> its index on its node
        for p in placements:
            self.local.append(per_node[p.node])
            per_node[p.node] += 1
        for node in sorted(per_node):
            self.hosts[node] = (
                ray.remote(NodeServers)
                .options(
                    num_cpus=0,
                    num_gpus=0,
                    max_concurrency=per_node[node] + 2,  # restarts of its servers run side by side, as on one node
                    scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[node].node_id, soft=False),
                )
                .remote(
                    cfg,
                    model_dir,
                    [p for p in placements if p.node == node],
                    seed=seed,
                    memory_saver=memory_saver,
                    python=python,
                )
            )
        self.node_ids = [nodes[p.node].node_id for p in placements]
        try:
            node_urls = {n: _get(h.urls.remote(), self.cfg.startup_timeout_s) for n, h in self.hosts.items()}
        except BaseException:
            self.stop()
            raise
        self._urls = [node_urls[p.node][i] for p, i in zip(placements, self.local)]

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    def _host(self, i: int) -> Any:
        return self.hosts[self.placements[i].node]

    def check_gpus(self) -> None:
        """Every node has the GPUs its servers need (RolloutError naming the node's count)."""
        for h in self.hosts.values():
            _get(h.check_gpus.remote(), CALL_MARGIN_S)

    def start(self, timeout_s: float) -> ClusterServers:
        """Start every node's servers at once and wait until all are healthy (stops them all on failure)."""
        logger.info("launching %d server(s) on %d node(s): %s", len(self._urls), len(self.hosts), self._urls)
        try:
            refs = [h.start.remote(timeout_s) for h in self.hosts.values()]
            for ref in refs:
                _get(ref, timeout_s + CALL_MARGIN_S)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, i: int, timeout_s: float, model_path: str | None = None) -> None:
        """SIGKILL server ``i`` and start it again on its node (see :meth:`ServerProcesses.restart`)."""
        _get(self._host(i).restart.remote(self.local[i], timeout_s, model_path), timeout_s + CALL_MARGIN_S)

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` on its node (logged, not raised, when its node's actor cannot be reached)."""
        try:
            _get(self._host(i).kill.remote(self.local[i]), CALL_MARGIN_S)
        except RolloutError as e:
            logger.warning("killing rollout server %d: %s", i, e)

    def log_tail(self, i: int) -> str:
        return _get(self._host(i).log_tail.remote(self.local[i]), CALL_MARGIN_S)

    def pid(self, i: int) -> int:
        """The process id of server ``i`` on its node."""
        return _get(self._host(i).pids.remote(), CALL_MARGIN_S)[self.local[i]]

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every node's servers (SIGTERM, SIGKILL after ``grace_s``), then end the actors."""
        refs = {n: h.stop.remote(grace_s) for n, h in self.hosts.items()}
        for n, ref in refs.items():
            try:
                _get(ref, grace_s + CALL_MARGIN_S)
            except RolloutError as e:  # its actor (or its node) is gone: nothing left to ask
                logger.warning("stopping the rollout servers of node %d: %s", n, e)
            ray.kill(self.hosts[n])
        self.hosts = {}

    def __enter__(self) -> ClusterServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_servers(cfg: SGLangConfig, model_dir: str, *, seed: int, memory_saver: bool) -> LaunchedServers:
    """Start ``cfg.num_servers`` servers and wait until they are healthy: on the driver's node as
    its subprocesses, or, when they need GPUs of other nodes of the Ray cluster, through one
    :class:`NodeServers` per node used (module docstring)."""
    # on this node whenever its GPUs hold every server, whatever Ray advertises (a split node)
    spread = ray.is_initialized() and gpus_needed(cfg) > node_gpus()
    nodes = gpu_nodes() if spread else []
    driver_node = ray.get_runtime_context().get_node_id() if nodes else None
    placements = place_servers(cfg, [n.gpus for n in nodes]) if nodes else []
    if not placements or all(nodes[p.node].node_id == driver_node for p in placements):
        check_gpus(cfg)
        commands = sglang_server_commands(cfg, model_dir, seed=seed, memory_saver=memory_saver)
        return ServerProcesses(commands, cfg.log_dir, cfg.health_timeout_s).start(cfg.startup_timeout_s)
    check_cluster_launch(cfg)
    servers = ClusterServers(cfg, model_dir, placements, nodes, seed=seed, memory_saver=memory_saver)
    try:
        servers.check_gpus()
    except BaseException:
        servers.stop()
        raise
    return servers.start(cfg.startup_timeout_s)
