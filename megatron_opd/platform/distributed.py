"""Distributed bootstrap: who am I (torchrun, Slurm, or explicit env), process groups, and
Megatron's model-parallel state.

Every worker group (student, each teacher, each reference) is its own torch.distributed world;
inside it, :func:`init_model_parallel` sets Megatron's TP/PP/EP/DP groups.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place in its world."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,07],gpu5`` -> ``[node01, node02, node03, node07, gpu5]`` (what
    ``scontrol show hostnames`` prints, without needing scontrol)."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}")
    return hosts


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read rank and rendezvous from torchrun (``RANK``...), else Slurm (``SLURM_PROCID``...),
    else a single process. ``MASTER_ADDR``/``MASTER_PORT`` override what Slurm implies."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_slurm_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            source="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0) or 0), "single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(env: DistEnv | None = None, *, backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Initialize the default process group for this worker group's world.

    Sets the CUDA device from ``local_rank`` on GPU and applies the compatibility layer
    (:func:`megatron_opd.platform.compat.activate`: version differences on every device, the CPU
    redirections without CUDA). ``timeout_s`` bounds every collective, so a dead peer ends the run
    with an error instead of a hang.
    """
    from megatron_opd.platform import compat

    env = env or detect_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    compat.activate()
    if not dist.is_initialized():
        port = env.master_port or free_port()
        dist.init_process_group(
            backend=backend or default_backend(),
            init_method=f"tcp://{env.master_addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return env


@dataclasses.dataclass(frozen=True)
class ParallelSizes:
    """Megatron's names. ``data_parallel_size`` is derived: world / (TP·PP·CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    context_parallel_size: int = 1


def init_model_parallel(sizes: ParallelSizes, *, seed: int = 1234, timeout_s: float = 1800.0) -> None:
    """Megatron's parallel state for the current world, and its per-rank RNG streams."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
        expert_tensor_parallel_size=sizes.expert_tensor_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# The process groups a model's rank works with, named as megatron's ``ProcessGroupCollection`` fields: ``tp`` (the
# vocab-parallel kernels), ``pp`` (which stage reports), ``dp`` (the optimizer step's reductions), ``dp_cp`` (the
# micro-batch alignment under expert parallelism), ``ep``.
MODEL_GROUPS = ("tp", "pp", "dp", "dp_cp", "ep")


def model_groups() -> ProcessGroupCollection:
    """This rank's :data:`MODEL_GROUPS` (megatron's ``pg_collection``), taken once after
    :func:`init_model_parallel` and passed explicitly from there on."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(list(MODEL_GROUPS))


def is_last_stage(groups: ProcessGroupCollection) -> bool:
    """This rank is on the last pipeline stage (it holds the logits)."""
    return dist.get_rank(groups.pp) == dist.get_world_size(groups.pp) - 1


def is_output_rank(groups: ProcessGroupCollection) -> bool:
    """TP rank 0 of the last pipeline stage: the rank that reports its DP rank's results."""
    return is_last_stage(groups) and dist.get_rank(groups.tp) == 0


def shutdown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
