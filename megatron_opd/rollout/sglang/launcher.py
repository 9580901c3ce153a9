"""Launching rollout servers as subprocesses: placement, command construction, ports, logs, readiness, teardown.

:func:`place_servers` puts each server on a node and its GPUs (pure); :func:`sglang_server_commands`
builds ``python -m sglang.launch_server`` command lines for the servers of one node (pure, so it is
tested on machines without SGLang); :class:`ServerProcesses` runs any list of server commands
(SGLang's, or ``opd serve`` in tests): one process group per server with its output in a log file,
waits until each answers ``GET /health`` (a server that exits or stays silent past the timeout is
an error quoting the end of its log), restarts one that died or hung (on the latest weights, given
as a new ``--model-path``), and stops them all (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import requests

from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.config import SGLangConfig

logger = logging.getLogger(__name__)

_LOG_TAIL = 40  # lines of a failed server's log quoted in the error


@dataclasses.dataclass
class ServerCommand:
    """One server to launch: its URL once up, the command line and extra environment variables."""

    url: str
    command: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    name: str = "server"

    def with_model_path(self, model_path: str) -> ServerCommand:
        """The same server loading ``model_path`` (the value after ``--model-path`` replaced)."""
        if MODEL_FLAG not in self.command[:-1]:
            raise RolloutError(f"{self.name}: its command has no {MODEL_FLAG} to replace: {self.command}")
        i = self.command.index(MODEL_FLAG) + 1
        return dataclasses.replace(self, command=[*self.command[:i], model_path, *self.command[i + 1 :]])


MODEL_FLAG = "--model-path"  # SGLang's flag; ``opd serve`` accepts it too


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_ports(host: str, start: int, count: int, avoid: set[int] | None = None) -> list[int]:
    """``count`` ports >= ``start`` that can be bound on ``host`` now (``start=0``: any free ports)."""
    avoid = set(avoid or ())
    ports: list[int] = []
    if start == 0:
        while len(ports) < count:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in avoid and port not in ports:
                ports.append(port)
        return ports
    for port in range(start, 65536):
        if port not in avoid and port_is_free(host, port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RolloutError(f"no {count} free ports from {start} on {host}. Fix: set rollout.sglang.base_port elsewhere.")


PORT_STRIDE = 10  # server i looks for its ports from base_port + i*PORT_STRIDE (SGLang may use neighbours)
SERVER_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "false"}  # log-probs at the sampling temperature (sampler.py)


@dataclasses.dataclass(frozen=True)
class ServerPlacement:
    """Where launched server ``index`` runs: node ``node`` (position in the order of the GPU nodes,
    0: the driver's), on that node's GPUs ``base_gpu_id ... base_gpu_id + tp*dp - 1``."""

    index: int
    node: int
    base_gpu_id: int


def place_servers(cfg: SGLangConfig, gpus_per_node: Sequence[int]) -> list[ServerPlacement]:
    """Server ``i`` takes the global GPUs ``base_gpu_id + i*tp*dp ...`` (``tp*dp`` of them), numbered
    node after node (with 8 per node: global GPU ``g`` is local GPU ``g % 8`` of node ``g // 8``).

    RolloutError when the nodes have too few GPUs, or when a server's GPUs would straddle two nodes
    (one SGLang server runs on one node)."""
    width = cfg.tp_size * cfg.dp_size
    starts = list(itertools.accumulate(gpus_per_node, initial=0))  # global id of each node's first GPU
    need = cfg.base_gpu_id + cfg.num_servers * width
    if need > starts[-1]:
        raise RolloutError(
            f"launching {cfg.num_servers} SGLang server(s) with tp={cfg.tp_size} dp={cfg.dp_size} from GPU "
            f"{cfg.base_gpu_id} needs {need} GPUs, the Ray cluster's GPU nodes have {starts[-1]} "
            f"({list(gpus_per_node)} per node). Fix: lower rollout.sglang.num_servers / tp_size / dp_size / "
            "base_gpu_id, add GPU nodes to the Ray cluster, or give running servers in rollout.sglang.urls."
        )
    placements = []
    for i in range(cfg.num_servers):
        first = cfg.base_gpu_id + i * width
        node = bisect.bisect_right(starts, first) - 1
        if first + width > starts[node + 1]:
            raise RolloutError(
                f"SGLang server {i} would take the global GPUs {first}..{first + width - 1}, across nodes {node} and "
                f"{node + 1} ({list(gpus_per_node)} GPUs per node); a server runs on one node. Fix: make "
                f"rollout.sglang.tp_size * dp_size ({width}) divide the GPUs per node and rollout.sglang.base_gpu_id "
                f"({cfg.base_gpu_id}) a multiple of it, or lower rollout.sglang.num_servers."
            )
        placements.append(ServerPlacement(i, node, first - starts[node]))
    return placements


def one_node(cfg: SGLangConfig) -> list[ServerPlacement]:
    """Every server on this node: server ``i`` on GPUs ``base_gpu_id + i*tp*dp ...``."""
    return place_servers(cfg, [cfg.base_gpu_id + cfg.num_servers * cfg.tp_size * cfg.dp_size])


def sglang_server_commands(
    cfg: SGLangConfig,
    model_dir: str,
    *,
    seed: int,
    python: str = sys.executable,
    memory_saver: bool = False,
    placements: Sequence[ServerPlacement] | None = None,
    host: str | None = None,
    url_host: str | None = None,
) -> list[ServerCommand]:
    """The ``sglang.launch_server`` commands of the servers ``placements`` puts on one node
    (default: all ``cfg.num_servers`` on this node, GPUs from ``base_gpu_id`` on).

    Server ``i`` (its global index) is named ``sglang{i}``, gets an HTTP port and an NCCL port found
    free on ``host`` from ``base_port + 10*i`` on, its placement's GPUs and random seed ``seed + i``,
    so the same servers result wherever they are placed. ``host``: the address the servers bind
    (default ``cfg.host``); ``url_host``: the one in their URLs (default ``host``). ``memory_saver``:
    with ``--enable-memory-saver`` (needed to release memory between rollouts);
    ``cfg.deterministic_inference``: with ``--enable-deterministic-inference`` (SGLang honours the
    per-row ``sampling_seed`` only then). ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is forced off: the
    servers report log-probs at the sampling temperature, as rollout correction needs.
    """
    extra = list(cfg.extra_args)
    for flag, wanted in (
        ("--enable-memory-saver", memory_saver),
        ("--enable-deterministic-inference", cfg.deterministic_inference),
    ):
        if wanted and flag not in extra:
            extra.append(flag)
    placements = placements or one_node(cfg)
    host = host or cfg.host
    taken: set[int] = set()
    commands = []
    for p in placements:
        http_port, nccl_port = find_free_ports(host, cfg.base_port + p.index * PORT_STRIDE, 2, avoid=taken)
        taken |= {http_port, nccl_port}
        command = [
            python, "-m", "sglang.launch_server",
            MODEL_FLAG, model_dir,
            "--host", host,
            "--port", str(http_port),
            "--tp-size", str(cfg.tp_size),
            "--dp-size", str(cfg.dp_size),
            "--mem-fraction-static", str(cfg.mem_fraction_static),
            "--base-gpu-id", str(p.base_gpu_id),
            "--nccl-port", str(nccl_port),
            "--random-seed", str(seed + p.index),
            *extra,
        ]  # fmt: skip
        url = f"http://{url_host or host}:{http_port}"
        commands.append(ServerCommand(url, command, dict(SERVER_ENV), f"sglang{p.index}"))
    return commands


def node_gpus() -> int:
    """This node's CUDA devices (not the GPUs Ray advertises: a node split between the trainer and the
    servers gives Ray its first GPUs, ``ray start --num-gpus``, and the servers the rest)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_needed(cfg: SGLangConfig, placements: Sequence[ServerPlacement] | None = None) -> int:
    """The GPUs of a node the servers ``placements`` puts there (default: all, from ``base_gpu_id`` on)
    reach up to: the last one's ``base_gpu_id + tp*dp``."""
    return max(p.base_gpu_id for p in placements or one_node(cfg)) + cfg.tp_size * cfg.dp_size


def check_gpus(cfg: SGLangConfig, placements: Sequence[ServerPlacement] | None = None) -> None:
    """The servers ``placements`` puts on this node (default: all) fit its GPUs (RolloutError otherwise)."""
    placements = placements or one_node(cfg)
    need, have = gpus_needed(cfg, placements), node_gpus()
    if need > have:
        raise RolloutError(
            f"launching {len(placements)} SGLang server(s) with tp={cfg.tp_size} dp={cfg.dp_size} from GPU "
            f"{placements[0].base_gpu_id} needs {need} GPUs, this node has {have}. Fix: lower "
            "rollout.sglang.num_servers / tp_size / dp_size, or give running servers in rollout.sglang.urls (on CPU "
            "use rollout.engine=hf)."
        )


class LaunchedServers(Protocol):
    """What the engine uses of the servers it launched: :class:`ServerProcesses` on one node, or
    ``ClusterServers`` (``cluster.py``) over a Ray cluster's nodes. Servers by global index."""

    @property
    def urls(self) -> list[str]: ...

    def restart(self, i: int, timeout_s: float, model_path: str | None = None) -> None: ...

    def kill(self, i: int) -> None: ...

    def log_tail(self, i: int) -> str: ...

    def stop(self, grace_s: float = 10.0) -> None: ...


class ServerProcesses:
    """Server subprocesses with log files; a context manager that stops them on exit."""

    def __init__(
        self, commands: list[ServerCommand], log_dir: str | Path | None = None, health_timeout_s: float = 30.0
    ) -> None:
        """``health_timeout_s``: how long one ``GET /health`` may take (SGLang generates a token
        for it and answers within its own 20 s)."""
        self.commands = commands
        self.health_timeout_s = health_timeout_s
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="opd_servers_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.log_paths = [self.log_dir / f"{c.name}.log" for c in commands]

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.commands]

    def start(self, timeout_s: float) -> ServerProcesses:
        """Start every server and wait until all are healthy (stops them all on failure)."""
        logger.info("launching %d server(s), logs in %s", len(self.commands), self.log_dir)
        try:
            self.procs = [self._spawn(i) for i in range(len(self.commands))]
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int) -> subprocess.Popen:
        cmd = self.commands[i]
        with open(self.log_paths[i], "ab") as log:
            return subprocess.Popen(
                cmd.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **cmd.env},
                start_new_session=True,  # its own process group: stop() and kill() reach its children
            )

    def restart(self, i: int, timeout_s: float, model_path: str | None = None) -> None:
        """SIGKILL server ``i`` (dead or hung) and start it again, on ``model_path`` when given, at
        the same URL; waits until it is healthy (RolloutError quoting its log otherwise)."""
        self.kill(i)
        if model_path is not None:
            self.commands[i] = self.commands[i].with_model_path(model_path)
        logger.warning("restarting %s (%s), log %s", self.commands[i].name, self.commands[i].url, self.log_paths[i])
        self.procs[i] = self._spawn(i)
        self.wait_ready(timeout_s, [i])

    def wait_ready(self, timeout_s: float, servers: list[int] | None = None) -> None:
        """Wait until ``servers`` (default: all) answer ``GET /health``."""
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self.commands)) if servers is None else servers)
        while pending:
            for i in sorted(pending):
                if self.procs[i].poll() is not None:
                    raise RolloutError(
                        f"{self.commands[i].name} ({self.commands[i].url}) exited with code {self.procs[i].returncode} "
                        f"while starting. Last lines of {self.log_paths[i]}:\n{self.log_tail(i)}"
                    )
                try:
                    probe = min(self.health_timeout_s, max(1.0, deadline - time.monotonic()))
                    if requests.get(self.commands[i].url + "/health", timeout=probe).status_code == 200:
                        pending.discard(i)
                except requests.RequestException:
                    pass
            if pending and time.monotonic() > deadline:
                i = min(pending)
                raise RolloutError(
                    f"{self.commands[i].name} ({self.commands[i].url}) not healthy after {timeout_s:.0f} s. "
                    f"Fix: raise rollout.sglang.startup_timeout_s or read {self.log_paths[i]}:\n{self.log_tail(i)}"
                )
            if pending:
                time.sleep(0.5)

    def log_tail(self, i: int) -> str:
        try:
            return "\n".join(self.log_paths[i].read_text(errors="replace").splitlines()[-_LOG_TAIL:])
        except OSError:
            return "(no log)"

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` and its children at once (tests; a crash)."""
        try:
            os.killpg(self.procs[i].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[i].wait()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every server's process group, SIGKILL what is left after ``grace_s``."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for i, p in enumerate(self.procs):
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(i)

    def __enter__(self) -> ServerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
