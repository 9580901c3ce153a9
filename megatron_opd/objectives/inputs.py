"""What an objective reads: the scores it requires, and the token batch built from what scoring returned.

:class:`Requirements` (``Objective.requirements``) says what must be computed per token, nothing more, and
turns into the :class:`~megatron_opd.scoring.contract.ScoringPlan` the driver runs. Scoring leaves each sample
its :class:`~megatron_opd.scoring.contract.SampleScores` by source; :func:`token_batch` lays a micro-batch's
samples out as a :class:`TokenBatch` in token order (the objective's names; the sample-level fields are named
alike on the sample: ``response_mask``, ``rollout_logp``, ``outcome_reward``). The student's outputs join the
batch once its forward has run: its logits rows (:meth:`TokenBatch.with_logits`), or the rows its output layer
reads and that layer's weight shard (:meth:`TokenBatch.with_hidden`: the fused LM head, no ``[N, V_local]``
logits tensor). Either way the objective's formulas are the same; only the vocabulary pass differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels import (
    TokenLogprobs,
    linear_token_logprobs,
    linear_topk_logprobs,
    token_logprobs,
    topk_logprobs,
)
from megatron_opd.scoring.contract import SampleScores, ScoreRequest, ScoringPlan, TokenScores


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What the trainer and scoring must supply per token, so nothing else is computed."""

    teacher_logp: bool = False  # ℓ_T at y_t
    reference: str | None = None  # None | student_base | teacher_base (reward correction): ℓ_R at y_t
    old_logp: bool = False  # ℓ_old at y_t (a separate student forward under the rollout weights)
    rollout_logp: bool = False  # ℓ_roll at y_t from the rollout engine
    support: str | None = None  # None | teacher_topk | student_topk: the [N, K] support ids
    top_k: int = 0
    outcome_reward: bool = False

    @property
    def teacher_scores_student_topk(self) -> bool:
        """The teacher must return log-probs at the student's top-K ids (computed under ℓ_old's weights)."""
        return self.support == "student_topk"

    def scoring_plan(self, metrics_top_k: int = 0) -> ScoringPlan:
        """The scoring passes these requirements need. The student scores for ℓ_old or its top-K support; the
        teacher always (ℓ_T, and its top-K: the support, or at ``metrics_top_k`` the top-K overlap metric's ids;
        at the student's top-K ids when that is the support); the reference only when ℓ_R is required."""
        student_topk = self.teacher_scores_student_topk
        student = ScoreRequest(top_k=self.top_k if student_topk else 0) if self.old_logp or student_topk else None
        return ScoringPlan(
            student=student,
            teacher=ScoreRequest(top_k=self.top_k if self.support else metrics_top_k, at_ids=student_topk),
            reference=ScoreRequest() if self.reference is not None else None,
        )


@dataclasses.dataclass(kw_only=True)
class TokenBatch:
    """One micro-batch's response tokens, flattened to ``N`` rows (all tensors on one device). Built before the
    student's forward (:func:`token_batch`); ``token_weight`` is set once the step's loss mask is counted, and
    ``logits`` (or ``hidden`` and ``output_weight``: the fused LM head) once the forward ran. The student's
    vocabulary passes go through :meth:`student_logprobs` and :meth:`student_topk` only."""

    logits: Tensor | None = None  # [N, V_local] student logits, this TP rank's vocab shard, with grad
    hidden: Tensor | None = None  # [N, H] the rows the student's output layer reads (fused LM head), with grad
    output_weight: Tensor | None = None  # [V_local, H] this TP rank's shard of the student's LM head, with grad
    labels: Tensor  # [N] int64 sampled tokens y_t (global ids)
    response_mask: Tensor  # [N] 1 on response tokens, 0 on prompt/padding
    token_weight: Tensor | None = None  # [N] w_t from aggregation.token_weights on the final loss mask
    seq_index: Tensor  # [N] int64 sequence of each token (unique within the micro-batch)
    teacher_logp: Tensor | None = None  # [N] ℓ_T(t), from each sample's own teacher
    ref_logp: Tensor | None = None  # [N] ℓ_R(t), from each sample's own reference
    old_logp: Tensor | None = None  # [N] ℓ_old(t), student under the rollout weights
    rollout_logp: Tensor | None = None  # [N] ℓ_roll(t), reported by the rollout engine
    support_ids: Tensor | None = None  # [N, K] int64 support ids (teacher top-K, or student top-K for LSM)
    support_teacher_logp: Tensor | None = None  # [N, K] teacher's full-vocab log-probs at support_ids
    support_valid: Tensor | None = None  # [N, K] bool, False on padded/duplicate entries
    teacher_topk_ids: Tensor | None = None  # [N, K] the teacher's own top-K ids (overlap metric), if not support_ids
    teacher_index: Tensor | None = None  # [N] int64 index into the objective's teacher_names
    outcome_reward: Tensor | None = None  # [N] the trajectory's outcome reward (accuracy-filtered AOPD)
    tp_group: ProcessGroup | None = None  # the student's tensor-parallel group (None: TP = 1)
    vocab_start: int | None = None  # first global id of this rank's shard (None: Megatron's even split)

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch with every tensor on ``device``."""
        moved = {
            f.name: value.to(device)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)

    def with_logits(self, logits: Tensor) -> TokenBatch:
        """The batch with the student's logits rows ``[N, V_local]`` (with grad), once its forward ran."""
        return dataclasses.replace(self, logits=logits)

    def with_hidden(self, hidden: Tensor, output_weight: Tensor) -> TokenBatch:
        """The batch with the rows ``[N, H]`` the student's output layer reads and its weight shard ``[V_local, H]``
        (both with grad), once its forward ran: the vocabulary passes then run on the fused LM head."""
        return dataclasses.replace(self, hidden=hidden, output_weight=output_weight)

    def _fused_head(self, why: str) -> tuple[Tensor, Tensor] | None:
        """``(hidden, output_weight)`` for the fused LM head, or None when the batch holds logits."""
        if self.logits is not None:
            return None
        hidden = require(self.hidden, "logits or TokenBatch.hidden", why)
        return hidden, require(self.output_weight, "output_weight", why)

    def student_logprobs(self, labels: Tensor, ids: Tensor | None, temperature: float) -> TokenLogprobs:
        """The objective's one pass over the student's vocabulary shard: ``ℓ_S`` at ``labels``, the entropy and
        the log-probs at ``ids`` (``-1``: skipped), with autograd (w.r.t. the logits, or the hidden rows and the
        LM head's weight)."""
        kw = dict(temperature=temperature, tp_group=self.tp_group, vocab_start=self.vocab_start)
        fused = self._fused_head("the loss (set by the trainer after the student's forward)")
        if fused is None:
            return token_logprobs(self.logits, labels, ids, **kw)
        return linear_token_logprobs(*fused, labels, ids, **kw)

    def student_topk(self, k: int, temperature: float) -> Tensor:
        """The student's top-``k`` ids ``[N, k]`` (forward only)."""
        kw = dict(temperature=temperature, tp_group=self.tp_group, vocab_start=self.vocab_start)
        fused = self._fused_head("the top-K overlap metric")
        if fused is None:
            return topk_logprobs(self.logits.detach(), k, **kw)[0]
        hidden, weight = fused
        no_labels = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
        return linear_topk_logprobs(hidden.detach(), weight.detach(), no_labels, k, **kw).ids


class ScoredSample(Protocol):
    """What :func:`token_batch` reads of a sample (``trainer.batch.Sample`` is one)."""

    teacher: str  # the teacher's name
    outcome_reward: float
    response_mask: Tensor | None  # [R]; None: every response token
    rollout_logp: Sequence[float]  # [R] ℓ_roll
    scores: SampleScores


def per_token(parts: Iterable[Tensor | Sequence[float] | None]) -> Tensor | None:
    """Per-response-token values of several samples concatenated in token order; None if any sample lacks them."""
    parts = list(parts)
    if not parts or any(p is None for p in parts):
        return None
    return torch.cat([torch.as_tensor(p) for p in parts], dim=0)


def _scores(sources: Sequence[TokenScores | None], pick: Callable[[TokenScores], Tensor | None]) -> Tensor | None:
    return per_token(None if s is None else pick(s) for s in sources)


def token_batch(
    samples: Sequence[ScoredSample],
    labels: Tensor,
    seq_index: Tensor,
    *,
    support: str | None,
    teacher_names: Sequence[str],
    tp_group: ProcessGroup | None = None,
) -> TokenBatch:
    """The token batch of ``samples`` (their response tokens in order: ``labels``, ``seq_index`` into
    ``samples``), with the scores each source returned. ``support`` (``Requirements.support``): the teacher's
    top-K is the support ids and its log-probs there, or (``student_topk``) the student's top-K with the
    teacher's log-probs at those ids (the teacher's own top-K then feeds the overlap metric); without a
    support the teacher's top-K, when scored, feeds the overlap metric."""
    student = [s.scores.student for s in samples]
    teacher = [s.scores.teacher for s in samples]
    reference = [s.scores.reference for s in samples]
    if support == "student_topk":
        support_ids = _scores(student, lambda t: t.topk_ids)
        support_teacher_logp = _scores(teacher, lambda t: t.ids_logp)
        teacher_topk_ids = _scores(teacher, lambda t: t.topk_ids)
    else:
        support_ids = _scores(teacher, lambda t: t.topk_ids)
        support_teacher_logp = _scores(teacher, lambda t: t.topk_logp)
        teacher_topk_ids = None
    response_mask = per_token(s.response_mask for s in samples)
    names = list(teacher_names)
    teacher_index = torch.tensor(
        [names.index(s.teacher) if s.teacher in names else 0 for s in samples], dtype=torch.long
    )
    reward = torch.tensor([float(s.outcome_reward) for s in samples])
    return TokenBatch(
        labels=labels,
        response_mask=torch.ones(labels.numel()) if response_mask is None else response_mask,
        seq_index=seq_index,
        teacher_logp=_scores(teacher, lambda t: t.logp),
        ref_logp=_scores(reference, lambda t: t.logp),
        old_logp=_scores(student, lambda t: t.logp),
        rollout_logp=per_token(s.rollout_logp for s in samples),
        support_ids=support_ids,
        support_teacher_logp=support_teacher_logp,
        teacher_topk_ids=teacher_topk_ids,
        teacher_index=teacher_index[seq_index],
        outcome_reward=reward[seq_index],
        tp_group=tp_group,
    )


def require(value: Tensor | None, field: str, why: str) -> Tensor:
    """``value``, or a ValueError naming the missing :class:`TokenBatch` field and what needs it."""
    if value is None:
        raise ValueError(f"TokenBatch.{field} is required by {why}; see Objective.requirements")
    return value
