"""Forward-only scoring of rollouts by a (frozen or student) Megatron model.

For every response token, what a :class:`~megatron_opd.scoring.contract.ScoreRequest` asks for: the sampled
token's log-prob, optionally the global top-K ids and log-probs, and log-probs at given ids (e.g. the
student's top-K for LSM) — all at the rollout temperature and through the vocab-parallel kernels, so nothing
of size V per token leaves the model's ranks (docs/objectives.md, Notation: scoring temperature == rollout
temperature). With ``fused_lm_head`` the forward stops before the output layer and the scores come from its input
rows and weight shard (``kernels.linear_token_logprobs``, ``kernels.linear_topk_logprobs``: the sampled token's
log-prob, the top-K and the log-probs at given ids in one pass per chunk of rows), so no ``[tokens, V/TP]`` logits
tensor exists. :class:`ScoringModel` is a frozen model (teacher, reference) on one rank of its group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_opd.kernels import (
    TokenLogprobs,
    linear_token_logprobs,
    linear_topk_logprobs,
    token_logprobs,
    topk_logprobs,
)
from megatron_opd.models.forward import model_forward, output_layer_input, output_weight, run_schedule
from megatron_opd.platform.distributed import is_output_rank
from megatron_opd.scoring.contract import ScoreRequest, TokenScores
from megatron_opd.trainer.batch import MicroBatch, MicroBatching, Sample

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


def response_rows(output: Tensor, mb: MicroBatch) -> Tensor:
    """The rows [N, X] at ``mb``'s response tokens' predicting positions of a batch-first model output [b, L, X]:
    logits (X = V_local) or the output layer's input (X = H)."""
    return output.reshape(-1, output.shape[-1]).index_select(0, mb.positions.to(output.device))


def score_rows(
    rows: Tensor,
    labels: Tensor,
    ids: Tensor | None,
    request: ScoreRequest,
    *,
    temperature: float,
    tp_group: object,
    weight: Tensor | None = None,
) -> TokenScores:
    """Per-token scores of one micro-batch (on the host) from its response logits rows ``[N, V_local]``, or with
    ``weight`` (the LM head's shard ``[V_local, H]``) from the rows ``[N, H]`` the output layer reads."""
    labels = labels.to(rows.device)
    ids = None if ids is None else ids.to(rows.device)
    kw = dict(temperature=temperature, tp_group=tp_group)
    top: tuple[Tensor, Tensor] | None = None
    if weight is None:
        stats = token_logprobs(rows, labels, ids, **kw)
        if request.top_k:
            top = topk_logprobs(rows, request.top_k, **kw)
    elif request.top_k:
        fused = linear_topk_logprobs(rows, weight, labels, request.top_k, ids, **kw)
        stats, top = TokenLogprobs(fused.label_logprob, fused.entropy, fused.ids_logprob), (fused.ids, fused.logprobs)
    else:
        stats = linear_token_logprobs(rows, weight, labels, ids, **kw)
    scores = TokenScores(logp=stats.label_logprob.float().cpu())
    if ids is not None:
        scores.ids_logp = stats.ids_logprob.float().cpu()
    if top is not None:
        scores.topk_ids, scores.topk_logp = top[0].cpu(), top[1].float().cpu()
    return scores


@torch.no_grad()
def score_microbatches(
    model: torch.nn.Module,
    microbatches: list[MicroBatch],
    request: ScoreRequest,
    ids: dict[int, Tensor] | None,
    *,
    temperature: float,
    groups: ProcessGroupCollection,
    fused_lm_head: bool,
) -> dict[int, TokenScores] | None:
    """Scores by sample uid on the output rank (TP rank 0, last stage); ``None`` on other ranks. ``ids``: by
    uid, the ids ``[R, K']`` to score each sample at (``request.at_ids``). ``fused_lm_head``: from the output
    layer's input and weight, without logits.

    Every rank of the group runs the same schedule (the kernels' collectives span the TP group).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def step(m: torch.nn.Module, mb: MicroBatch) -> tuple[Tensor, object]:
        out = model_forward(m, mb.model_inputs(device), hidden=fused_lm_head)
        at = torch.cat([ids[s.uid] for s in mb.samples]) if ids is not None and mb.samples else None

        def collect(output: Tensor) -> tuple[Tensor, TokenScores]:
            if fused_lm_head:
                rows, weight = response_rows(output_layer_input(m, output), mb), output_weight(m)
            else:
                rows, weight = response_rows(output, mb), None
            return output.new_zeros(()), score_rows(
                rows, mb.labels, at, request, temperature=temperature, tp_group=groups.tp, weight=weight
            )

        return out, collect

    results = run_schedule(model, microbatches, step, forward_only=True)
    if not is_output_rank(groups):
        return None
    per_sample: dict[int, TokenScores] = {}
    for mb, scores in zip(microbatches, results):
        for sample, part in zip(mb.samples, scores.split(mb.response_lens)):
            per_sample[sample.uid] = part
    return per_sample


def score_samples(
    model: torch.nn.Module,
    samples: list[Sample],
    request: ScoreRequest,
    ids: dict[int, Tensor] | None,
    *,
    batching: MicroBatching,
    temperature: float,
    groups: ProcessGroupCollection,
    fused_lm_head: bool,
) -> dict[int, TokenScores] | None:
    """This DP rank's ``samples`` scored by ``model`` (see :func:`score_microbatches`); ``{}`` without samples."""
    microbatches = batching.split(samples, groups)
    if not microbatches:
        return {}
    return score_microbatches(
        model, microbatches, request, ids, temperature=temperature, groups=groups, fused_lm_head=fused_lm_head
    )


class ScoringModel:
    """A frozen model (teacher or reference) on one rank of its group: scores its DP rank's samples; its
    parameters go to the host while another colocated group uses the GPU."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batching: MicroBatching,
        temperature: float,
        groups: ProcessGroupCollection,
        fused_lm_head: bool,
    ) -> None:
        self.model, self.batching, self.temperature, self.groups = model, batching, temperature, groups
        self.fused_lm_head = fused_lm_head  # scores from the output layer's input and weight, without logits

    def score(
        self, samples: list[Sample], request: ScoreRequest, ids: dict[int, Tensor] | None = None
    ) -> dict[int, TokenScores] | None:
        return score_samples(
            self.model,
            samples,
            request,
            ids,
            batching=self.batching,
            temperature=self.temperature,
            groups=self.groups,
            fused_lm_head=self.fused_lm_head,
        )

    def offload(self) -> None:
        """The parameters to the host (no-op without CUDA)."""
        if torch.cuda.is_available():
            self.model.cpu()
            torch.cuda.empty_cache()

    def onload(self) -> None:
        if torch.cuda.is_available():
            self.model.cuda()
