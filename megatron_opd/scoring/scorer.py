"""Forward-only scoring of rollouts by a (frozen or student) Megatron model.

For every response token, what a :class:`~megatron_opd.scoring.contract.ScoreRequest` asks for: the sampled
token's log-prob, optionally the global top-K ids and log-probs, and log-probs at given ids (e.g. the
student's top-K for LSM) — all at the rollout temperature and through the vocab-parallel kernels, so nothing
of size V per token leaves the model's ranks (docs/objectives.md, Notation: scoring temperature == rollout
temperature). :class:`ScoringModel` is a frozen model (teacher, reference) on one rank of its group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_opd.kernels import token_logprobs, topk_logprobs
from megatron_opd.models.forward import model_forward, run_schedule
from megatron_opd.platform.distributed import is_output_rank
from megatron_opd.scoring.contract import ScoreRequest, TokenScores
from megatron_opd.trainer.batch import MicroBatch, MicroBatching, Sample

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


def response_rows(output: Tensor, mb: MicroBatch) -> Tensor:
    """The logits rows [N, V_local] that predict ``mb``'s response tokens, from model output [b, L, V_local]."""
    return output.reshape(-1, output.shape[-1]).index_select(0, mb.positions.to(output.device))


def score_rows(
    rows: Tensor, labels: Tensor, ids: Tensor | None, request: ScoreRequest, *, temperature: float, tp_group: object
) -> TokenScores:
    """Per-token scores of one micro-batch from its response logits rows (on the host)."""
    labels = labels.to(rows.device)
    ids = None if ids is None else ids.to(rows.device)
    stats = token_logprobs(rows, labels, ids, temperature=temperature, tp_group=tp_group)
    scores = TokenScores(logp=stats.label_logprob.float().cpu())
    if ids is not None:
        scores.ids_logp = stats.ids_logprob.float().cpu()
    if request.top_k:
        topk_ids, topk_logp = topk_logprobs(rows, request.top_k, temperature=temperature, tp_group=tp_group)
        scores.topk_ids, scores.topk_logp = topk_ids.cpu(), topk_logp.float().cpu()
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
) -> dict[int, TokenScores] | None:
    """Scores by sample uid on the output rank (TP rank 0, last stage); ``None`` on other ranks. ``ids``: by
    uid, the ids ``[R, K']`` to score each sample at (``request.at_ids``).

    Every rank of the group runs the same schedule (the kernels' collectives span the TP group).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def step(m: torch.nn.Module, mb: MicroBatch) -> tuple[Tensor, object]:
        out = model_forward(m, mb.model_inputs(device))
        at = torch.cat([ids[s.uid] for s in mb.samples]) if ids is not None and mb.samples else None

        def collect(output: Tensor) -> tuple[Tensor, TokenScores]:
            rows = response_rows(output, mb)
            return output.new_zeros(()), score_rows(
                rows, mb.labels, at, request, temperature=temperature, tp_group=groups.tp
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
) -> dict[int, TokenScores] | None:
    """This DP rank's ``samples`` scored by ``model`` (see :func:`score_microbatches`); ``{}`` without samples."""
    microbatches = batching.split(samples, groups)
    if not microbatches:
        return {}
    return score_microbatches(model, microbatches, request, ids, temperature=temperature, groups=groups)


class ScoringModel:
    """A frozen model (teacher or reference) on one rank of its group: scores its DP rank's samples; its
    parameters go to the host while another colocated group uses the GPU."""

    def __init__(
        self, model: torch.nn.Module, *, batching: MicroBatching, temperature: float, groups: ProcessGroupCollection
    ) -> None:
        self.model, self.batching, self.temperature, self.groups = model, batching, temperature, groups

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
        )

    def offload(self) -> None:
        """The parameters to the host (no-op without CUDA)."""
        if torch.cuda.is_available():
            self.model.cpu()
            torch.cuda.empty_cache()

    def onload(self) -> None:
        if torch.cuda.is_available():
            self.model.cuda()
