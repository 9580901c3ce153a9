"""The student's optimizer step on one DP rank's rollouts, top to bottom.

1. Split the rollouts into ``mini_batches_per_step`` mini-batches (PPO-clip form when > 1).
2. Per mini-batch: micro-batches under the token budget; the objective's final loss mask ``M_t``
   per token; global token/sequence counts over all micro-batches and DP ranks; per-token weights
   ``w_t`` so each micro-batch's loss ``Σ w_t L_t`` adds up to the global-batch loss
   (OBJECTIVES.md, Notation: aggregation over the whole global batch).
3. Megatron's schedule runs forward/backward with the objective as loss function. megatron divides
   each micro-batch loss by the number of micro-batches and DDP averages gradients over DP, so the
   loss handed back is multiplied by both to keep the gradient of the global loss.
4. Non-finite losses or gradient norm anywhere in the group, or a mini-batch without a single
   unmasked response token, skip the update (counted).
5. Optimizer step (gradient clipping inside), LR schedule step; metrics reduced over DP.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import Tensor

from megatron_opd.models.forward import model_forward, run_schedule
from megatron_opd.objectives.aggregation import global_counts, local_counts, token_weights
from megatron_opd.objectives.base import TokenBatch
from megatron_opd.objectives.metrics import Metrics, merge_metrics, reduce_metrics
from megatron_opd.scoring.scorer import response_rows
from megatron_opd.trainer.batch import MicroBatch, Sample

if TYPE_CHECKING:
    from megatron_opd.trainer.worker import ModelWorker


def split_mini_batches(samples: list[Sample], n: int) -> list[list[Sample]]:
    """``n`` contiguous, near-equal mini-batches in uid order (every DP rank splits its own shard)."""
    ordered = sorted(samples, key=lambda s: s.uid)
    size = math.ceil(len(ordered) / n)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)] or [[]]


def token_batch(worker: ModelWorker, mb: MicroBatch, rows: Tensor, weights: Tensor) -> TokenBatch:
    """The objective's view of one micro-batch (all per-token fields in token order)."""
    device = rows.device
    objective = worker.objective

    def field(name: str) -> Tensor | None:
        t = mb.per_token(name)
        return None if t is None else t.to(device)

    req = objective.requirements
    support_ids = support_logp = None
    if req.support == "teacher_topk":
        support_ids, support_logp = field("teacher_topk_ids"), field("teacher_topk_logp")
    elif req.support == "student_topk":
        support_ids, support_logp = field("student_topk_ids"), field("teacher_ids_logp")
    else:  # no support in the loss: the teacher's top-K (when fetched) feeds the top-K overlap metric only
        support_ids, support_logp = field("teacher_topk_ids"), field("teacher_topk_logp")
    names = list(worker.spec.teacher_names)
    teacher_index = torch.tensor(
        [names.index(s.teacher) if s.teacher in names else 0 for s in mb.samples], device=device
    )[mb.seq_index.to(device)]
    reward = torch.tensor([float(s.reward) for s in mb.samples], device=device)[mb.seq_index.to(device)]
    response_mask = field("loss_mask")
    return TokenBatch(
        logits=rows,
        labels=mb.labels.to(device),
        response_mask=torch.ones(mb.num_tokens, device=device) if response_mask is None else response_mask,
        token_weight=weights.to(device),
        seq_index=mb.seq_index.to(device),
        teacher_logp=field("teacher_logp"),
        ref_logp=field("ref_logp"),
        old_logp=field("old_logp"),
        rollout_logp=field("rollout_logprobs"),
        support_ids=support_ids,
        support_teacher_logp=support_logp,
        teacher_topk_ids=field("teacher_topk_ids") if req.support == "student_topk" else None,
        teacher_index=teacher_index,
        outcome_reward=reward,
        tp_group=ps.get_tensor_model_parallel_group(),
    )


def final_masks(worker: ModelWorker, mbs: list[MicroBatch]) -> list[Tensor]:
    """``M_t`` per micro-batch: response tokens minus masked special tokens and rejected tokens."""
    masks = []
    for mb in mbs:
        response = mb.per_token("loss_mask")
        masks.append(
            worker.objective.loss_mask(
                torch.ones(mb.num_tokens) if response is None else response,
                mb.labels,
                old_logp=mb.per_token("old_logp"),
                rollout_logp=mb.per_token("rollout_logprobs"),
                seq_index=mb.seq_index,
            )
        )
    return masks


class MiniBatchLoss:
    """The schedule's forward step for one mini-batch: the objective as loss function, scaled for
    megatron's averaging, with non-finite losses flagged (zeroed, so backward stays finite)."""

    def __init__(self, worker: ModelWorker, scale: int, device: str) -> None:
        self.worker, self.scale, self.device = worker, scale, device
        self.bad = torch.zeros(1, device=device)
        self.loss = torch.zeros((), dtype=torch.float64)

    def __call__(self, model: torch.nn.Module, item: tuple[MicroBatch, Tensor]) -> tuple[Tensor, Any]:
        mb, weights = item
        output = model_forward(model, mb.model_inputs(self.device))

        def loss_fn(out: Tensor) -> tuple[Tensor, Metrics]:
            if mb.num_tokens == 0:  # padding micro-batch (expert-parallel alignment): no loss, no metrics
                return out.sum() * 0.0, {}
            result = self.worker.objective(token_batch(self.worker, mb, response_rows(out, mb), weights))
            if torch.isfinite(result.loss):
                loss = result.loss
                self.loss += result.loss.detach().double().cpu()
            else:
                self.bad.fill_(1.0)
                loss = result.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
            return loss * self.scale, result.metrics

        return output, loss_fn


def _with_common_keys(metrics: Metrics, group: dist.ProcessGroup) -> Metrics:
    """Every DP rank reports the union of all ranks' metric names (a rank whose micro-batches were
    all padding has none), so the reduction's collective sees equal shapes."""
    names: list[list[str]] = [[] for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(names, sorted(metrics), group=group)
    zero = torch.zeros((), dtype=torch.float64, device=next(iter(metrics.values()))[0].device if metrics else None)
    return {n: metrics.get(n, (zero, zero)) for n in sorted(set().union(*names))}


def run_train_step(worker: ModelWorker, samples: list[Sample]) -> dict[str, Any] | None:
    model, optimizer, objective = worker.model, worker.optimizer, worker.objective
    dp_group = ps.get_data_parallel_group()
    dp_size = ps.get_data_parallel_world_size()
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.train()
    metrics_parts: list[Metrics] = []
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    grad_norms: list[float] = []
    skipped = 0
    for mini in split_mini_batches(samples, worker.spec.mini_batches_per_step):
        mbs = worker._microbatches(mini, at_least_one=True)
        masks = final_masks(worker, mbs)
        counts = global_counts([local_counts(m, mb.seq_index) for m, mb in zip(masks, mbs)], group=dp_group)
        if counts.tokens == 0:  # every response token masked on every rank: no loss, so no update
            skipped += 1
            continue
        weights = [token_weights(m, mb.seq_index, counts, objective.cfg.loss_agg_mode) for m, mb in zip(masks, mbs)]
        step = MiniBatchLoss(worker, len(mbs) * dp_size, device)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        shape = tuple(mbs[0].input_ids.shape)
        results = run_schedule(model, list(zip(mbs, weights)), step, forward_only=False, shape=shape)
        if last_stage:
            metrics_parts.extend(results)
        loss_total += step.loss.to(device)
        dist.all_reduce(step.bad)  # the whole group agrees on skipping
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        if step.bad.item() > 0 or not math.isfinite(grad_norm):
            skipped += 1
            continue
        if worker.spec.optim.clip_grad > 0:
            optimizer.clip_grad_norm(worker.spec.optim.clip_grad)
        optimizer.step_with_ready_grads()
        worker.scheduler.step(increment=1)
        grad_norms.append(grad_norm)
    if not last_stage:
        return None
    dist.all_reduce(loss_total, group=dp_group)
    out: dict[str, Any] = reduce_metrics(_with_common_keys(merge_metrics(metrics_parts), dp_group), group=dp_group)
    out.update(
        {
            "train/loss": float(loss_total),
            "train/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "train/lr": float(optimizer.param_groups[0]["lr"]),
            "train/skipped_updates": float(skipped),
        }
    )
    return out if ps.get_tensor_model_parallel_rank() == 0 else None
