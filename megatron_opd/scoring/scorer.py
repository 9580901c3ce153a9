"""Forward-only scoring of rollouts by a (frozen or student) Megatron model.

For every response token: the sampled token's log-prob, optionally the global top-K ids and
log-probs, and log-probs at given ids (e.g. the student's top-K for LSM) — all at the rollout
temperature and through the vocab-parallel kernels, so nothing of size V per token leaves the
model's ranks (OBJECTIVES.md: scoring temperature == rollout temperature).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from torch import Tensor

from megatron_opd.kernels import token_logprobs, topk_logprobs
from megatron_opd.models.forward import model_forward, run_schedule
from megatron_opd.trainer.batch import MicroBatch


def response_rows(output: Tensor, mb: MicroBatch) -> Tensor:
    """The logits rows [N, V_local] that predict ``mb``'s response tokens, from model output [b, L, V_local]."""
    return output.reshape(-1, output.shape[-1]).index_select(0, mb.positions.to(output.device))


def score_rows(
    rows: Tensor, mb: MicroBatch, *, temperature: float, top_k: int, ids_field: str | None
) -> dict[str, Tensor]:
    """Per-token scores of one micro-batch from its response logits rows."""
    tp_group = ps.get_tensor_model_parallel_group()
    labels = mb.labels.to(rows.device)
    ids = mb.per_token(ids_field) if ids_field else None
    stats = token_logprobs(
        rows, labels, None if ids is None else ids.to(rows.device), temperature=temperature, tp_group=tp_group
    )
    out = {"logp": stats.label_logprob.float().cpu()}
    if ids is not None:
        out["ids_logp"] = stats.ids_logprob.float().cpu()
    if top_k:
        topk_ids, topk_logp = topk_logprobs(rows, top_k, temperature=temperature, tp_group=tp_group)
        out["topk_ids"], out["topk_logp"] = topk_ids.cpu(), topk_logp.float().cpu()
    return out


@torch.no_grad()
def score_microbatches(
    model: torch.nn.Module,
    microbatches: list[MicroBatch],
    *,
    temperature: float,
    top_k: int = 0,
    ids_field: str | None = None,
) -> dict[int, dict[str, Tensor]] | None:
    """Scores by sample uid on the output rank (TP rank 0, last stage); ``None`` on other ranks.

    Every rank of the group runs the same schedule (the kernels' collectives span the TP group).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def step(m: torch.nn.Module, mb: MicroBatch) -> tuple[Tensor, object]:
        out = model_forward(m, mb.model_inputs(device))

        def collect(output: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            scores = score_rows(
                response_rows(output, mb), mb, temperature=temperature, top_k=top_k, ids_field=ids_field
            )
            return output.new_zeros(()), scores

        return out, collect

    results = run_schedule(model, microbatches, step, forward_only=True)
    if not (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0):
        return None
    per_sample: dict[int, dict[str, Tensor]] = {}
    for mb, scores in zip(microbatches, results):
        for name, tensor in scores.items():
            for sample, part in zip(mb.samples, mb.split_per_sample(tensor)):
                per_sample.setdefault(sample.uid, {})[name] = part.clone()
    return per_sample
