"""The student's optimizer step on one DP rank's scored rollouts, top to bottom (:func:`train_step`, on the
student's state: ``trainer.student.StudentState``).

1. Split the rollouts into ``mini_batches_per_step`` mini-batches (PPO-clip form when > 1).
2. Per mini-batch: micro-batches under the token budget; each one's token batch (the objective's view of its
   samples and their scores); the objective's final loss mask ``M_t`` per token; global token/sequence counts
   over all micro-batches and DP ranks; per-token weights ``w_t`` so each micro-batch's loss ``Σ w_t L_t``
   adds up to the global-batch loss (docs/objectives.md, Notation: aggregation over the whole global batch).
3. Megatron's schedule runs forward/backward with the objective as loss function: on the fused LM head
   (``trainer.fused_lm_head``, the default) the last stage's forward stops before the output layer and the
   objective's vocabulary pass reads the response rows of its input and its weight shard
   (``kernels.linear_token_logprobs``), so no ``[tokens, V/TP]`` logits tensor or gradient exists; otherwise it
   reads the response rows of the logits. megatron divides
   each micro-batch loss by the number of micro-batches and DDP averages gradients over DP, so the
   loss handed back is multiplied by both to keep the gradient of the global loss.
4. Non-finite losses or gradient norm anywhere in the group, or a mini-batch without a single
   unmasked response token, skip the update (counted).
5. Gradient clipping by the norm over all parameters (each of megatron's chained optimizers — dense and
   expert-parallel parameters — clipped by that total), optimizer step, LR schedule step; metrics reduced
   over DP.

The scores arrive with the samples (``Sample.scores``), computed whenever scoring ran.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from torch import Tensor

from megatron_opd.models.forward import model_forward, output_layer_input, output_weight, run_schedule
from megatron_opd.objectives.aggregation import global_counts, local_counts, token_weights
from megatron_opd.objectives.base import Objective
from megatron_opd.objectives.inputs import TokenBatch
from megatron_opd.objectives.metrics import Metrics, merge_metrics, reduce_metrics
from megatron_opd.platform.distributed import is_last_stage, is_output_rank
from megatron_opd.scoring.scorer import response_rows
from megatron_opd.trainer.batch import MicroBatch, MicroBatching, Sample

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


class TrainingState(Protocol):
    """What a train step works with: Megatron's DDP-wrapped ``model``, its ``optimizer`` and LR ``scheduler``, the
    ``objective``, the micro-batching, the rank's process groups, and the step's settings."""

    model: Any
    optimizer: Any
    scheduler: Any
    objective: Objective
    batching: MicroBatching
    groups: ProcessGroupCollection
    clip_grad: float  # 0: no clipping
    mini_batches_per_step: int
    fused_lm_head: bool  # the loss from the output layer's input and weight, without logits


@dataclasses.dataclass(frozen=True)
class TrainMetrics:
    """One optimizer step of the student, reduced over its data-parallel ranks."""

    loss: float  # the global-batch loss, summed over the mini-batches
    grad_norm: float  # mean over the applied updates (NaN when none was)
    lr: float  # after the step
    skipped_updates: int  # mini-batches whose update was skipped (non-finite, or nothing to learn from)
    objective: dict[str, float]  # the objective's metrics over the global batch

    def as_dict(self) -> dict[str, float]:
        """The metrics under their logged names (``train/...`` and the objective's own)."""
        return {
            **self.objective,
            "train/loss": self.loss,
            "train/grad_norm": self.grad_norm,
            "train/lr": self.lr,
            "train/skipped_updates": float(self.skipped_updates),
        }


def split_mini_batches(samples: list[Sample], n: int) -> list[list[Sample]]:
    """``n`` contiguous, near-equal mini-batches in uid order (every DP rank splits its own shard)."""
    ordered = sorted(samples, key=lambda s: s.uid)
    size = math.ceil(len(ordered) / n)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)] or [[]]


class MiniBatchLoss:
    """The schedule's forward step for one mini-batch: the objective as loss function (on the fused LM head with
    ``fused_lm_head``), scaled for megatron's averaging, with non-finite losses flagged (zeroed, so backward stays
    finite)."""

    def __init__(self, objective: Objective, scale: int, device: str, fused_lm_head: bool) -> None:
        self.objective, self.scale, self.device, self.fused_lm_head = objective, scale, device, fused_lm_head
        self.bad = torch.zeros(1, device=device)
        self.loss = torch.zeros((), dtype=torch.float64)

    def student_outputs(self, model: torch.nn.Module, out: Tensor, mb: MicroBatch, batch: TokenBatch) -> TokenBatch:
        """``batch`` with the last stage's output rows of ``mb``'s response tokens: logits, or the output layer's
        input and weight."""
        if self.fused_lm_head:
            return batch.with_hidden(response_rows(output_layer_input(model, out), mb), output_weight(model))
        return batch.with_logits(response_rows(out, mb))

    def __call__(self, model: torch.nn.Module, item: tuple[MicroBatch, TokenBatch]) -> tuple[Tensor, Any]:
        mb, batch = item
        output = model_forward(model, mb.model_inputs(self.device), hidden=self.fused_lm_head)

        def loss_fn(out: Tensor) -> tuple[Tensor, Metrics]:
            if mb.num_tokens == 0:  # padding micro-batch (expert-parallel alignment): no loss, no metrics
                return out.sum() * 0.0, {}
            result = self.objective(self.student_outputs(model, out, mb, batch.to(self.device)))
            if torch.isfinite(result.loss):
                loss = result.loss
                self.loss += result.loss.detach().double().cpu()
            else:
                self.bad.fill_(1.0)
                loss = result.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
            return loss * self.scale, result.metrics

        return output, loss_fn


def clip_gradients(optimizer: Any, max_norm: float, total_norm: float) -> None:
    """Scale the gradients of every parameter by ``max_norm / total_norm`` where that is below 1: each of
    megatron's chained optimizers (dense and expert-parallel parameters) by the norm over all of them, as
    ``ChainedOptimizer.step`` does (``MegatronOptimizer.clip_grad_norm`` reads a single optimizer's state)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params:
            decoupled = opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            clip_grad_by_total_norm_fp32(params, max_norm, total_norm, decoupled)


def _with_common_keys(metrics: Metrics, group: dist.ProcessGroup) -> Metrics:
    """Every DP rank reports the union of all ranks' metric names (a rank whose micro-batches were
    all padding has none), so the reduction's collective sees equal shapes."""
    names: list[list[str]] = [[] for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(names, sorted(metrics), group=group)
    zero = torch.zeros((), dtype=torch.float64, device=next(iter(metrics.values()))[0].device if metrics else None)
    return {n: metrics.get(n, (zero, zero)) for n in sorted(set().union(*names))}


def accumulate_gradients(
    state: TrainingState, mini: list[Sample], device: str
) -> tuple[MiniBatchLoss, list[Metrics]] | None:
    """Forward and backward of one mini-batch (steps 2–3): the gradient of its part of the global-batch loss in
    the model's gradient buffers, the loss step (its summed loss, its non-finite flag) and the last stage's
    metrics; ``None`` when no response token is left unmasked on any DP rank."""
    objective, groups = state.objective, state.groups
    mbs = state.batching.split(mini, groups, at_least_one=True)
    batches = [objective.token_batch(mb.samples, mb.labels, mb.seq_index, groups.tp) for mb in mbs]
    masks = [
        objective.loss_mask(
            b.response_mask, b.labels, old_logp=b.old_logp, rollout_logp=b.rollout_logp, seq_index=b.seq_index
        )
        for b in batches
    ]
    counts = global_counts([local_counts(m, b.seq_index) for m, b in zip(masks, batches)], group=groups.dp)
    if counts.tokens == 0:
        return None
    mode = objective.cfg.loss_agg_mode
    batches = [
        dataclasses.replace(b, token_weight=token_weights(m, b.seq_index, counts, mode)) for m, b in zip(masks, batches)
    ]
    step = MiniBatchLoss(objective, len(mbs) * dist.get_world_size(groups.dp), device, state.fused_lm_head)
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    shape = tuple(mbs[0].input_ids.shape)
    return step, run_schedule(state.model, list(zip(mbs, batches)), step, forward_only=False, shape=shape)


def train_step(state: TrainingState, samples: list[Sample]) -> TrainMetrics | None:
    """One optimizer step per mini-batch over this DP rank's scored ``samples``; the metrics on the output ranks
    (``None`` on the others)."""
    model, optimizer, groups = state.model, state.optimizer, state.groups
    dp_group = groups.dp
    last_stage = is_last_stage(groups)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.train()
    metrics_parts: list[Metrics] = []
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    grad_norms: list[float] = []
    skipped = 0
    for mini in split_mini_batches(samples, state.mini_batches_per_step):
        accumulated = accumulate_gradients(state, mini, device)
        if accumulated is None:  # every response token masked on every rank: no loss, so no update
            skipped += 1
            continue
        step, results = accumulated
        if last_stage:
            metrics_parts.extend(results)
        loss_total += step.loss.to(device)
        dist.all_reduce(step.bad, group=dist.group.WORLD)  # the whole group agrees on skipping
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        if step.bad.item() > 0 or not math.isfinite(grad_norm):
            skipped += 1
            continue
        if state.clip_grad > 0:
            clip_gradients(optimizer, state.clip_grad, grad_norm)
        optimizer.step_with_ready_grads()
        state.scheduler.step(increment=1)
        grad_norms.append(grad_norm)
    if not last_stage:
        return None
    dist.all_reduce(loss_total, group=dp_group)
    objective_metrics = reduce_metrics(_with_common_keys(merge_metrics(metrics_parts), dp_group), group=dp_group)
    metrics = TrainMetrics(
        loss=float(loss_total),
        grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
        lr=float(optimizer.param_groups[0]["lr"]),
        skipped_updates=skipped,
        objective=objective_metrics,
    )
    return metrics if is_output_rank(groups) else None
