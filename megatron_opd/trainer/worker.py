"""One rank of a worker group, as the Ray actor that holds it: a Megatron-Core model in its own
torch.distributed world.

:meth:`ModelWorker.setup` joins the world, takes the rank's process groups and loads the model; a frozen group
(teacher, reference) then holds a :class:`~megatron_opd.scoring.scorer.ScoringModel`, the student group a
:class:`~megatron_opd.trainer.student.StudentState` (model, optimizer, LR schedule, objective), and every group
a :class:`~megatron_opd.trainer.weight_export.WeightExport` of its model. Every other method hands one call to
them: the actor is a shell (``worker_group`` drives it).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any

import torch
from torch import Tensor

from megatron_opd.config.schema import ModelConfig, OptimConfig, model_hf_dir
from megatron_opd.objectives.base import Objective
from megatron_opd.scoring.contract import ScoreRequest, TokenScores
from megatron_opd.scoring.scorer import ScoringModel
from megatron_opd.trainer.batch import MicroBatching, Sample
from megatron_opd.trainer.student import StudentState
from megatron_opd.trainer.train_step import TrainMetrics
from megatron_opd.trainer.weight_export import WeightExport


@dataclasses.dataclass
class WorkerSpec:
    """Everything a rank needs to build its part of a group (picklable, sent to Ray actors)."""

    group: str  # "student", "teacher/<name>", "reference/<name>"
    model: ModelConfig
    load_from: str  # HF directory or Megatron checkpoint to load the weights from
    trainable: bool = False
    seed: int = 1
    timeout_s: float = 1800.0
    optim: OptimConfig | None = None
    objective: Objective | None = None  # the student's, built once by the driver
    total_steps: int = 1
    mini_batches_per_step: int = 1
    max_tokens_per_microbatch: int = 8192
    sequence_packing: bool = True
    pad_id: int = 0
    temperature: float = 1.0  # the rollout temperature, which scoring runs at
    fused_lm_head: bool = True  # loss and scores from the output layer's input and weight (trainer.fused_lm_head)


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    is_output_rank: bool  # TP rank 0 of the last pipeline stage: reports results for its DP rank
    device: str
    hostname: str


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_worker_model(spec: WorkerSpec, hf_config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """This rank's part of the group's model (parallel state initialized), before its weights are loaded: the
    student with its recomputation; a teacher or reference frozen (``build_gpt_model(frozen=True)``: no
    recomputation, no router losses, eval mode, no gradients); the local spec's compiled kernels as the model's
    ``fusion`` says (auto: where CUDA is present)."""
    from megatron_opd.models.qwen3 import build_gpt_model

    par = spec.model.parallel
    model = build_gpt_model(
        hf_config,
        spec=spec.model.spec,
        fusion=spec.model.fusion_enabled,
        frozen=not spec.trainable,
        params_dtype=dtype,
        sequence_parallel=par.sequence_parallel,
        recompute_granularity=spec.model.recompute_granularity,
        variable_seq_lengths=par.pipeline_model_parallel_size > 1,
    )
    return model.cuda() if torch.cuda.is_available() else model


class ModelWorker:
    def __init__(self, spec: WorkerSpec, rank: int, world_size: int) -> None:
        # Megatron's TP/SP communication overlap needs kernels issued in order: one hardware queue.
        # Set here, before this process creates its CUDA context, not for the whole job (rollout
        # servers would lose the overlap of their own kernels).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.state: StudentState | ScoringModel | None = None
        self.weights: WeightExport | None = None

    @property
    def student(self) -> StudentState:
        """The student's state (the student group only)."""
        if not isinstance(self.state, StudentState):
            raise RuntimeError(f"group {self.spec.group!r} rank {self.rank} holds no student (setup first)")
        return self.state

    def _weights(self) -> WeightExport:
        if self.weights is None:
            raise RuntimeError(f"group {self.spec.group!r} rank {self.rank}: setup first")
        return self.weights

    # ---- setup ----

    def rendezvous(self) -> tuple[str, int]:
        """This node's address (the one other nodes reach it at) and a free port, for rank 0 to host
        the group's store."""
        from megatron_opd.platform.distributed import free_port
        from megatron_opd.rollout.weight_group import node_address

        addr = node_address() if torch.cuda.is_available() else "127.0.0.1"
        return addr, free_port()

    def setup(self, master_addr: str, master_port: int) -> RankInfo:
        from megatron_opd.convert.hf_io import load_hf_config
        from megatron_opd.convert.load import load_hf_weights
        from megatron_opd.convert.mcore_io import is_mcore_checkpoint, load_model_checkpoint
        from megatron_opd.platform.distributed import (
            DistEnv,
            ParallelSizes,
            init_distributed,
            init_model_parallel,
            is_output_rank,
            model_groups,
        )

        spec, par = self.spec, self.spec.model.parallel
        local_rank = 0  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        env = DistEnv(self.rank, self.world_size, local_rank, master_addr, master_port, "ray")
        init_distributed(env, timeout_s=spec.timeout_s)
        init_model_parallel(
            ParallelSizes(
                par.tensor_model_parallel_size,
                par.pipeline_model_parallel_size,
                par.expert_model_parallel_size,
                par.expert_tensor_parallel_size,
            ),
            seed=spec.seed,
            timeout_s=spec.timeout_s,
        )
        groups = model_groups()
        hf_config = load_hf_config(model_hf_dir(spec.load_from))
        dtype = resolve_dtype(spec.model.dtype)
        model = build_worker_model(spec, hf_config, dtype)
        if is_mcore_checkpoint(spec.load_from):
            load_model_checkpoint(model, spec.load_from)
        else:
            load_hf_weights(model, spec.load_from)
        tp = torch.distributed.get_world_size(groups.tp)
        batching = MicroBatching(
            spec.max_tokens_per_microbatch,
            spec.sequence_packing,
            spec.pad_id,
            tp if model.config.sequence_parallel else 1,
        )
        if spec.trainable:
            if spec.optim is None or spec.objective is None:
                raise ValueError(f"group {spec.group!r}: a trainable group needs WorkerSpec.optim and .objective")
            self.state = StudentState.build(
                model,
                dtype=dtype,
                optim=spec.optim,
                objective=spec.objective,
                total_steps=spec.total_steps,
                mini_batches_per_step=spec.mini_batches_per_step,
                batching=batching,
                groups=groups,
                fused_lm_head=spec.fused_lm_head,
                hf_config=hf_config,
                rank=self.rank,
            )
        else:
            self.state = ScoringModel(
                model,
                batching=batching,
                temperature=spec.temperature,
                groups=groups,
                fused_lm_head=spec.fused_lm_head,
            )
        self.weights = WeightExport(model, hf_config, self.rank)
        return RankInfo(
            rank=self.rank,
            world_size=self.world_size,
            tp_rank=torch.distributed.get_rank(groups.tp),
            pp_rank=torch.distributed.get_rank(groups.pp),
            dp_rank=torch.distributed.get_rank(groups.dp),
            dp_size=torch.distributed.get_world_size(groups.dp),
            is_output_rank=is_output_rank(groups),
            device="cuda" if torch.cuda.is_available() else "cpu",
            hostname=socket.gethostname(),
        )

    # ---- what the group asks of its ranks ----

    def score(
        self, samples: list[Sample], request: ScoreRequest, ids: dict[int, Tensor] | None = None
    ) -> dict[int, TokenScores] | None:
        """Per sample (by uid) what ``request`` asks for (see ``scoring.contract``); on the output ranks."""
        if self.state is None:
            raise RuntimeError(f"group {self.spec.group!r} rank {self.rank}: setup first")
        return self.state.score(samples, request, ids)

    def train_step(self, samples: list[Sample]) -> TrainMetrics | None:
        return self.student.train_step(samples)

    def save_checkpoint(self, path: str, iteration: int) -> None:
        self.student.save(path, iteration)

    def load_checkpoint(self, path: str) -> None:
        self.student.load(path)

    def export_hf_tensors(self) -> list[tuple[str, torch.Tensor]] | None:
        return self._weights().tensors()

    def save_hf_weights(self, out_dir: str, tokenizer_dir: str) -> int | None:
        return self._weights().save(out_dir, tokenizer_dir)

    def weight_sync_rendezvous(self, master_address: str | None, master_port: int) -> tuple[str, int] | None:
        return self._weights().rendezvous(master_address, master_port)

    def join_weight_sync(
        self, address: str, port: int, world_size: int, group_name: str, backend: str, timeout_s: float
    ) -> None:
        self._weights().join(address, port, world_size, group_name, backend, timeout_s)

    def weight_specs(self) -> list[Any] | None:
        return self._weights().specs()

    def broadcast_weights(self, group_name: str, bucket_bytes: int) -> int | None:
        return self._weights().broadcast(group_name, bucket_bytes)

    def leave_weight_sync(self, group_name: str) -> None:
        self._weights().leave(group_name)

    def offload(self) -> None:
        if self.state is not None:
            self.state.offload()

    def onload(self) -> None:
        if self.state is not None:
            self.state.onload()

    def ping(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "time": time.time()}
