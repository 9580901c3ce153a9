"""One rank of a worker group: a Megatron-Core model in its own torch.distributed world.

Frozen groups (teachers, references) only score: forward-only over micro-batches, returning per
response token the sampled-token log-prob, the top-K ids/log-probs and log-probs at given ids
(:mod:`megatron_opd.scoring`). The student group also trains: Megatron DDP + (distributed)
optimizer + LR schedule, the objective as the schedule's loss function, checkpoints and HF
weight export for rollout weight sync. Ray runs each instance as an actor (``worker_group``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any

import torch

from megatron_opd.config.schema import ModelConfig, OptimConfig, model_hf_dir
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.trainer.batch import (
    MicroBatch,
    Sample,
    build_microbatch,
    build_packed_microbatch,
    common_shapes,
    split_by_token_budget,
)


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
    objective: ObjectiveConfig | None = None
    total_steps: int = 1
    mini_batches_per_step: int = 1
    max_tokens_per_microbatch: int = 8192
    sequence_packing: bool = True
    pad_id: int = 0
    temperature: float = 1.0
    teacher_names: tuple[str, ...] = ()


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


class ModelWorker:
    def __init__(self, spec: WorkerSpec, rank: int, world_size: int) -> None:
        # Megatron's TP/SP communication overlap needs kernels issued in order: one hardware queue.
        # Set here, before this process creates its CUDA context, not for the whole job (rollout
        # servers would lose the overlap of their own kernels).
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.model: Any = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.objective: Any = None
        self.hf_config: Any = None
        self._host_params: list[torch.nn.Parameter] = []  # offloaded parameters outside the DDP buffers
        self._weight_groups: dict[str, Any] = {}  # rank 0: SGLang weight-update groups it broadcasts to

    # ---- setup ----

    def rendezvous(self) -> tuple[str, int]:
        """This node's address (the one other nodes reach it at) and a free port, for rank 0 to host
        the group's store."""
        from megatron_opd.platform.distributed import free_port
        from megatron_opd.rollout.weight_group import node_address

        addr = node_address() if torch.cuda.is_available() else "127.0.0.1"
        return addr, free_port()

    def setup(self, master_addr: str, master_port: int) -> RankInfo:
        from megatron.core import parallel_state as ps

        from megatron_opd.convert.hf_io import load_hf_config
        from megatron_opd.models.qwen3 import build_gpt_model
        from megatron_opd.platform.distributed import DistEnv, ParallelSizes, init_distributed, init_model_parallel

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
        self.hf_config = load_hf_config(model_hf_dir(spec.load_from))
        dtype = resolve_dtype(spec.model.dtype)
        model = build_gpt_model(
            self.hf_config,
            spec=spec.model.spec,
            params_dtype=dtype,
            sequence_parallel=par.sequence_parallel,
            recompute_granularity=spec.model.recompute_granularity,
            variable_seq_lengths=par.pipeline_model_parallel_size > 1,
        )
        if torch.cuda.is_available():
            model.cuda()
        self._load_weights(model, spec.load_from)
        if spec.trainable:
            self._setup_training(model, dtype)
        else:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = model
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        return RankInfo(
            rank=self.rank,
            world_size=self.world_size,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            is_output_rank=last and ps.get_tensor_model_parallel_rank() == 0,
            device="cuda" if torch.cuda.is_available() else "cpu",
            hostname=socket.gethostname(),
        )

    def _load_weights(self, model: torch.nn.Module, path: str) -> None:
        from megatron_opd.convert.load import load_hf_weights
        from megatron_opd.convert.mcore_io import is_mcore_checkpoint, load_model_checkpoint

        if is_mcore_checkpoint(path):
            load_model_checkpoint(model, path)
        else:
            load_hf_weights(model, path)

    def _setup_training(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_opd.objectives.registry import build_objective

        spec, opt = self.spec, self.spec.optim
        assert opt is not None and spec.objective is not None
        model.config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=opt.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(model.config, ddp_config, model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=opt.use_distributed_optimizer,
            ),
            [self.model],
        )
        updates = spec.total_steps * spec.mini_batches_per_step
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if opt.warmup_steps else opt.lr,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=opt.warmup_steps * spec.mini_batches_per_step,
            lr_decay_steps=max(updates, opt.warmup_steps * spec.mini_batches_per_step + 1),
            lr_decay_style=opt.lr_decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=updates,
            wd_incr_style="constant",
        )
        self.objective = build_objective(
            spec.objective,
            mini_batches_per_step=spec.mini_batches_per_step,
            temperature=spec.temperature,
            teacher_names=spec.teacher_names,
        )

    # ---- micro-batching ----

    def _multiple_of(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_world_size() if self._unwrapped().config.sequence_parallel else 1

    def _microbatches(self, samples: list[Sample], at_least_one: bool = False) -> list[MicroBatch]:
        """This DP rank's micro-batches. Under expert parallelism every DP rank runs the same number
        of micro-batches of the same shapes (MoE layers exchange tokens across them in each forward),
        padded with rows that hold no response tokens. ``at_least_one``: a rank without samples still
        runs one padding micro-batch (training: every DP rank must join the gradient reduction)."""
        from megatron.core import parallel_state as ps

        m, packed = self._multiple_of(), self.spec.sequence_packing

        def build(group: list[Sample], shape: tuple[int, int] | None = None) -> MicroBatch:
            if packed:
                return build_packed_microbatch(group, self.spec.pad_id, m, None if shape is None else shape[1])
            return build_microbatch(group, self.spec.pad_id, m, shape)

        groups = split_by_token_budget(samples, self.spec.max_tokens_per_microbatch, m, packed)
        if not groups and at_least_one:
            groups = [[]]
        mbs = [build(g) for g in groups]
        if ps.get_expert_model_parallel_world_size() == 1 or ps.get_data_parallel_world_size() == 1:
            return mbs
        mine = [tuple(mb.input_ids.shape) for mb in mbs]
        everyone: list[list[tuple[int, int]]] = [[] for _ in range(ps.get_data_parallel_world_size())]
        torch.distributed.all_gather_object(
            everyone, mine, group=ps.get_data_parallel_group(with_context_parallel=True)
        )
        shapes = common_shapes(everyone)
        return [build(groups[i] if i < len(groups) else [], shape) for i, shape in enumerate(shapes)]

    def _unwrapped(self) -> torch.nn.Module:
        model = self.model
        while hasattr(model, "module"):
            model = model.module
        return model

    # ---- scoring ----

    @torch.no_grad()
    def score(
        self, samples: list[Sample], *, top_k: int = 0, ids_field: str | None = None
    ) -> dict[int, dict[str, torch.Tensor]] | None:
        """Per sample (by uid), per response token: ``logp`` [R], and with ``top_k`` ``topk_ids`` /
        ``topk_logp`` [R, K], and with ``ids_field`` ``ids_logp`` [R, K'] at ``sample.<ids_field>``.
        Returned by the output ranks only."""
        from megatron_opd.scoring.scorer import score_microbatches

        microbatches = self._microbatches(samples)
        if not microbatches:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            out = score_microbatches(
                self.model,
                microbatches,
                temperature=self.spec.temperature,
                top_k=top_k,
                ids_field=ids_field,
            )
        finally:
            self.model.train(was_training)
        return out

    # ---- training ----

    def train_step(self, samples: list[Sample]) -> dict[str, float] | None:
        """One optimizer step per mini-batch over this DP rank's samples; metrics on output ranks."""
        from megatron_opd.trainer.train_step import run_train_step

        return run_train_step(self, samples)

    # ---- weights ----

    def export_hf_tensors(self) -> list[tuple[str, torch.Tensor]] | None:
        """The full model in HF naming (CPU tensors) on rank 0, ``None`` on the others."""
        from megatron_opd.convert.export import iter_hf_tensors

        pairs = [(n, t.detach().cpu()) for n, t in iter_hf_tensors(self._unwrapped(), self.hf_config)]
        return pairs if self.rank == 0 else None

    def save_hf_weights(self, out_dir: str, tokenizer_dir: str) -> int | None:
        """Write the full model as an HF safetensors directory from rank 0, streaming (one shard
        in memory at a time; every rank takes part in the gathers). Bytes written on rank 0."""
        from megatron_opd.convert.export import iter_hf_tensors, save_hf_checkpoint

        pairs = iter_hf_tensors(self._unwrapped(), self.hf_config)
        if self.rank != 0:
            for _ in pairs:
                pass
            return None
        cpu = ((n, t.detach().cpu()) for n, t in pairs)
        return save_hf_checkpoint(cpu, out_dir, self.hf_config, tokenizer_dir=tokenizer_dir, overwrite=True)

    # SGLang's distributed weight sync (the driver's StudentWeightSender): rank 0 hosts the group's
    # TCP store and broadcasts; every rank takes part in gathering the tensors

    def weight_sync_rendezvous(self, master_address: str | None, master_port: int) -> tuple[str, int] | None:
        """Rank 0: where it will host the weight-update group's TCP store (default: this node's address)."""
        from megatron_opd.rollout.weight_group import rendezvous_address

        return rendezvous_address(master_address, master_port) if self.rank == 0 else None

    def join_weight_sync(
        self, address: str, port: int, world_size: int, group_name: str, backend: str, timeout_s: float
    ) -> None:
        """Rank 0 joins the weight-update group as its rank 0 (returns once every server joined)."""
        from megatron_opd.rollout.weight_group import init_weight_update_group

        if self.rank == 0:
            self._weight_groups[group_name] = (
                init_weight_update_group(address, port, 0, world_size, group_name, backend, timeout_s),
                backend,
            )

    def weight_specs(self) -> list[Any] | None:
        """Rank 0: name, dtype and shape of every HF tensor :meth:`broadcast_weights` sends, in order."""
        from megatron_opd.convert.export import hf_tensor_specs
        from megatron_opd.rollout.sglang.weight_sync import TensorSpec
        from megatron_opd.rollout.weight_group import dtype_name

        specs = hf_tensor_specs(self._unwrapped(), self.hf_config)
        return [TensorSpec(n, dtype_name(d), shape) for n, d, shape in specs] if self.rank == 0 else None

    def broadcast_weights(self, group_name: str, bucket_bytes: int) -> int | None:
        """The full model in HF naming, gathered from every rank to rank 0, which broadcasts each
        tensor over the weight-update group (a bucket at a time). Rank 0: the number sent."""
        from megatron_opd.convert.export import iter_hf_tensors
        from megatron_opd.rollout.sglang.weight_sync import broadcast_tensors, group_device

        tensors = iter_hf_tensors(self._unwrapped(), self.hf_config)
        if self.rank != 0:
            for _ in tensors:
                pass
            return None
        group, backend = self._weight_groups[group_name]
        return broadcast_tensors(tensors, group, group_device(backend), bucket_bytes)

    def leave_weight_sync(self, group_name: str) -> None:
        from megatron_opd.rollout.weight_group import destroy_weight_update_group

        if group_name in self._weight_groups:
            destroy_weight_update_group(self._weight_groups.pop(group_name)[0])

    def save_checkpoint(self, path: str, iteration: int) -> None:
        from megatron_opd.trainer.checkpoint import save_training_state

        save_training_state(self, path, iteration)

    def load_checkpoint(self, path: str) -> None:
        from megatron_opd.trainer.checkpoint import load_training_state

        load_training_state(self, path)

    def offload(self) -> None:
        """Free this rank's GPU memory while another colocated group runs: the student's DDP
        param/grad buffers and optimizer state go to CPU (megatron's RL offload hooks), and so do
        parameters the buffers do not hold (without the distributed optimizer they keep no
        ``param_data``); a frozen model's parameters too. No-op without CUDA.

        fp32 parameters with the distributed optimizer cannot be offloaded (its fp32 shards are views of
        the buffer whose storage goes first): the config refuses them (``OPDConfig.validate``)."""
        if not torch.cuda.is_available():
            return
        if self.optimizer is not None:
            buffers = self.model.buffers + self.model.expert_parallel_buffers
            for buffer in buffers:
                buffer.offload_to_cpu(move_params=True, move_grads=True)
            self.optimizer.offload_to_cpu()
            self._host_params = [p for b in buffers if b.param_data is None for p in b.params]
            for p in self._host_params:
                p.data = p.data.cpu().pin_memory()
        else:
            self.model.cpu()
        torch.cuda.empty_cache()

    def onload(self) -> None:
        if not torch.cuda.is_available():
            return
        if self.optimizer is not None:
            for buffer in self.model.buffers + self.model.expert_parallel_buffers:
                buffer.reload_from_cpu(move_params=True, move_grads=True)
            self.optimizer.restore_from_cpu()
            for p in self._host_params:
                p.data = p.data.cuda(non_blocking=True)
            self._host_params = []
        else:
            self.model.cuda()

    def ping(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "time": time.time()}
