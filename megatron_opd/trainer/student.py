"""The student on one rank of its group: everything it keeps between steps, and what it does with it.

:class:`StudentState` owns the Megatron DDP model, the (distributed) optimizer, the LR schedule and the
objective, built once (:meth:`StudentState.build`) with explicit arguments and the rank's process groups
(megatron's ``pg_collection``). It scores its rollouts under the current weights (``ℓ_old``, its top-K), takes
an optimizer step on samples whatever scored them and whenever (``trainer.train_step``), saves and loads its
training state (``trainer.student_checkpoint``) and moves its state off the GPU while colocated groups run.
The Ray actor around it is ``trainer.worker.ModelWorker`` (which also exports its weights to the rollout
engine: ``trainer.weight_export``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from megatron_opd.config.schema import OptimConfig
from megatron_opd.convert.load import unwrap_model
from megatron_opd.objectives.base import Objective
from megatron_opd.scoring.contract import ScoreRequest, TokenScores
from megatron_opd.scoring.scorer import ScoringModel
from megatron_opd.trainer.batch import MicroBatching, Sample
from megatron_opd.trainer.student_checkpoint import load_training_state, save_training_state
from megatron_opd.trainer.train_step import TrainMetrics, train_step

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


class StudentState:
    """The student's model, optimizer, LR schedule and objective on one rank."""

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        objective: Objective,
        *,
        batching: MicroBatching,
        groups: ProcessGroupCollection,
        clip_grad: float,
        mini_batches_per_step: int,
        fused_lm_head: bool,
        hf_config: Any,
        rank: int,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.objective = model, optimizer, scheduler, objective
        self.batching, self.groups, self.rank = batching, groups, rank
        self.clip_grad, self.mini_batches_per_step = clip_grad, mini_batches_per_step
        self.fused_lm_head = fused_lm_head  # loss and scores from the output layer's input and weight, no logits
        self.hf_config = hf_config  # the HF description of the model (recorded in checkpoints)
        self.scorer = ScoringModel(
            model, batching=batching, temperature=objective.temperature, groups=groups, fused_lm_head=fused_lm_head
        )
        self._host_params: list[torch.nn.Parameter] = []  # offloaded parameters outside the DDP buffers

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        *,
        dtype: torch.dtype,
        optim: OptimConfig,
        objective: Objective,
        total_steps: int,
        mini_batches_per_step: int,
        batching: MicroBatching,
        groups: ProcessGroupCollection,
        fused_lm_head: bool,
        hf_config: Any,
        rank: int,
    ) -> StudentState:
        """Wrap the freshly loaded ``model`` (a ``GPTModel`` with parameters in ``dtype``) in Megatron's DDP and
        give it Megatron's optimizer (Adam; distributed when ``optim.use_distributed_optimizer``) and LR schedule
        over ``total_steps × mini_batches_per_step`` updates. ``fused_lm_head``: the loss and the student's scores
        from its output layer's input and weight, without logits (``trainer.fused_lm_head``)."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        model.config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        )
        ddp = DistributedDataParallel(model.config, ddp_config, model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=optim.use_distributed_optimizer,
            ),
            [ddp],
        )
        updates = total_steps * mini_batches_per_step
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if optim.warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps * mini_batches_per_step,
            lr_decay_steps=max(updates, optim.warmup_steps * mini_batches_per_step + 1),
            lr_decay_style=optim.lr_decay_style,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=updates,
            wd_incr_style="constant",
        )
        return cls(
            ddp,
            optimizer,
            scheduler,
            objective,
            batching=batching,
            groups=groups,
            clip_grad=optim.clip_grad,
            mini_batches_per_step=mini_batches_per_step,
            fused_lm_head=fused_lm_head,
            hf_config=hf_config,
            rank=rank,
        )

    @property
    def module(self) -> torch.nn.Module:
        """The ``GPTModel`` inside the DDP wrapper."""
        return unwrap_model(self.model)

    # ---- scoring and training ----

    @torch.no_grad()
    def score(
        self, samples: list[Sample], request: ScoreRequest, ids: dict[int, Tensor] | None = None
    ) -> dict[int, TokenScores] | None:
        """This DP rank's samples scored under the current weights (``ℓ_old``, the student top-K); by uid on
        the output ranks."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.scorer.score(samples, request, ids)
        finally:
            self.model.train(was_training)

    def train_step(self, samples: list[Sample]) -> TrainMetrics | None:
        """One optimizer step per mini-batch over this DP rank's scored samples; metrics on the output ranks."""
        return train_step(self, samples)

    # ---- checkpoints ----

    def save(self, path: str, iteration: int) -> None:
        """This rank's part of the training state into the checkpoint directory ``path``."""
        save_training_state(
            path,
            iteration,
            module=self.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            hf_config=self.hf_config,
            rank=self.rank,
        )

    def load(self, path: str) -> None:
        """The training state of checkpoint ``path`` (written at any layout)."""
        load_training_state(
            path, module=self.module, optimizer=self.optimizer, scheduler=self.scheduler, rank=self.rank
        )

    # ---- device memory ----

    def offload(self) -> None:
        """Free this rank's GPU memory while another colocated group runs: the DDP param/grad buffers and
        optimizer state go to CPU (megatron's RL offload hooks), and so do parameters the buffers do not hold
        (without the distributed optimizer they keep no ``param_data``). No-op without CUDA.

        fp32 parameters with the distributed optimizer cannot be offloaded (its fp32 shards are views of
        the buffer whose storage goes first): the config refuses them (``OPDConfig.validate``)."""
        if not torch.cuda.is_available():
            return
        buffers = self.model.buffers + self.model.expert_parallel_buffers
        for buffer in buffers:
            buffer.offload_to_cpu(move_params=True, move_grads=True)
        self.optimizer.offload_to_cpu()
        self._host_params = [p for b in buffers if b.param_data is None for p in b.params]
        for p in self._host_params:
            p.data = p.data.cpu().pin_memory()
        torch.cuda.empty_cache()

    def onload(self) -> None:
        if not torch.cuda.is_available():
            return
        for buffer in self.model.buffers + self.model.expert_parallel_buffers:
            buffer.reload_from_cpu(move_params=True, move_grads=True)
        self.optimizer.restore_from_cpu()
        for p in self._host_params:
            p.data = p.data.cuda(non_blocking=True)
        self._host_params = []
