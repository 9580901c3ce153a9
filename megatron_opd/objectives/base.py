"""The objective interface the trainer calls (OBJECTIVES.md §1-§6).

Per micro-batch the trainer flattens the response tokens to ``N`` rows and fills a :class:`TokenBatch`:
the student's logits shard ``[N, V_local]`` (with grad), labels ``y_t``, the masks, and the scores the
objective's :class:`Requirements` ask for (teacher/reference/old/rollout log-probs at ``y_t``, a top-K
support with the teacher's log-probs on it). Calling the objective returns an :class:`ObjectiveOutput`:
this micro-batch's scalar loss ``Σ_t w_t L_t`` (``w_t`` from ``aggregation.token_weights``) and metrics
as (sum, count) pairs.

The vocabulary-sized work is one :func:`megatron_opd.kernels.token_logprobs` call (one fused pass over
the logits shard forward, one backward; ``ℓ_S``, entropy and the student's log-probs on the support),
plus a forward-only :func:`megatron_opd.kernels.topk_logprobs` for the top-K overlap metric; the rest is
[N] / [N, K] torch math. No [N, V] fp32 tensor is built.

Masks: ``response_mask`` marks response tokens; :meth:`Objective.loss_mask` removes special tokens (§4)
and rollout-rejected tokens (§6) to give the final ``M_t``. The trainer counts tokens/sequences of that
final mask over the whole step (``aggregation.local_counts``/``global_counts``) before computing weights.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels import TokenLogprobs, token_logprobs, topk_logprobs
from megatron_opd.objectives.aggregation import aggregate
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.metrics import Metrics, masked_metric
from megatron_opd.objectives.reference import LOG_RATIO_BOUND, policy_gradient_token_loss
from megatron_opd.objectives.rollout_correction import mismatch_metrics, rejection_keep, token_is_weights


@dataclasses.dataclass
class TokenBatch:
    """One micro-batch's response tokens, flattened to ``N`` rows (all tensors on the logits' device)."""

    logits: Tensor  # [N, V_local] student logits, this TP rank's vocab shard, with grad
    labels: Tensor  # [N] int64 sampled tokens y_t (global ids)
    response_mask: Tensor  # [N] 1 on response tokens, 0 on prompt/padding
    token_weight: Tensor  # [N] w_t from aggregation.token_weights on the final loss mask
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


@dataclasses.dataclass
class ObjectiveOutput:
    """``loss``: scalar with grad, ``Σ_t w_t L_t`` of this micro-batch. ``metrics``: (sum, count) pairs."""

    loss: Tensor
    metrics: Metrics


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


@dataclasses.dataclass
class StudentScores:
    """What one kernel pass gives an objective, with the masks and support already applied."""

    keep: Tensor  # [N] bool, the final loss mask M_t
    logp: Tensor  # [N] ℓ_S with grad (0 where not kept)
    entropy: Tensor  # [N]
    support_logp: Tensor | None  # [N, K'] student log-probs on the support, with grad
    support_teacher_logp: Tensor | None  # [N, K']
    support_valid: Tensor | None  # [N, K'] bool (False on masked rows)
    is_weight: Tensor  # [N] rollout-correction weights w_t (1 when rollout_is = none)


class Objective(abc.ABC):
    """Base of every objective: masks, the shared kernel pass, rollout correction, the policy-gradient
    term and the common metrics. Subclasses implement :meth:`token_losses` (the per-token ``L_t``)."""

    policy_gradient: bool = False  # has a −A_t ℓ_S(t) term, which rollout correction and PPO-clip apply to
    on_policy: bool = True  # trains on student rollouts (False: SFT on teacher text)

    def __init__(
        self,
        cfg: ObjectiveConfig,
        *,
        masked_token_ids: Sequence[int] = (),
        ppo_clip: bool = False,
        temperature: float = 1.0,
        teacher_names: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.masked_token_ids = torch.tensor(sorted({int(i) for i in masked_token_ids}), dtype=torch.int64)
        self.ppo_clip = ppo_clip
        self.temperature = temperature
        self.teacher_names = tuple(teacher_names)

    # ---- what the trainer must supply ----

    def support_kind(self) -> str | None:
        """None, or the support of §3-§5: teacher_topk | student_topk | teacher_topk+sampled."""
        return None

    @property
    def requirements(self) -> Requirements:
        cfg, kind = self.cfg, self.support_kind()
        rs = self.on_policy and cfg.rollout_rs != "none"
        return Requirements(
            teacher_logp=self.on_policy,
            reference=cfg.reference if cfg.needs_reference() else None,
            old_logp=rs or (self.policy_gradient and (self.ppo_clip or cfg.advantage_logp == "old")),
            rollout_logp=self.on_policy and (cfg.rollout_is != "none" or rs),
            support=None if kind is None else kind.removesuffix("+sampled"),
            top_k=cfg.top_k if kind is not None else 0,
            outcome_reward=cfg.name == "aopd" and cfg.aopd_variant == "accuracy_filtered",
        )

    # ---- masks ----

    def _masks(
        self,
        response_mask: Tensor,
        labels: Tensor,
        old_logp: Tensor | None,
        rollout_logp: Tensor | None,
        seq_index: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(response, response minus special tokens, final M_t) as bool [N]."""
        response = response_mask > 0
        unspecial = response
        if self.cfg.special_token_mask and self.masked_token_ids.numel():
            unspecial = response & ~torch.isin(labels, self.masked_token_ids.to(labels.device))
        final = unspecial
        if self.on_policy and self.cfg.rollout_rs != "none":
            why = "objective.rollout_rs"
            old, roll = require(old_logp, "old_logp", why), require(rollout_logp, "rollout_logp", why)
            seq = require(seq_index, "seq_index", why)
            lower, upper = self.cfg.rs_bounds
            final = unspecial & rejection_keep(old, roll, unspecial, seq, self.cfg.rollout_rs, lower, upper)
        return response, unspecial, final

    def loss_mask(
        self,
        response_mask: Tensor,
        labels: Tensor,
        *,
        old_logp: Tensor | None = None,
        rollout_logp: Tensor | None = None,
        seq_index: Tensor | None = None,
    ) -> Tensor:
        """The final loss mask ``M_t`` (float [N]): response tokens, minus masked special tokens (§4),
        minus rollout-rejected tokens (§6). Count it for aggregation before computing token weights."""
        return self._masks(response_mask, labels, old_logp, rollout_logp, seq_index)[2].float()

    # ---- the loss ----

    def __call__(self, batch: TokenBatch) -> ObjectiveOutput:
        """This micro-batch's loss ``Σ_t w_t L_t`` and metrics. ``ℓ_old`` defaults to ``sg(ℓ_S)`` (one
        update per rollout batch: the weights that generated the rollout are the current ones)."""
        b = batch
        response, unspecial, keep = self._masks(b.response_mask, b.labels, b.old_logp, b.rollout_logp, b.seq_index)
        labels = torch.where(keep, b.labels, torch.full_like(b.labels, -1))
        support = self._support(b, keep, labels)
        tl: TokenLogprobs = token_logprobs(
            b.logits,
            labels,
            None if support is None else support[0],
            temperature=self.temperature,
            tp_group=b.tp_group,
            vocab_start=b.vocab_start,
        )
        metrics: Metrics = {"student/entropy": masked_metric(tl.entropy, keep)}
        old = b.old_logp if b.old_logp is not None else tl.label_logprob.detach()
        is_weight = torch.ones_like(tl.label_logprob)
        if self.on_policy and (self.cfg.rollout_is != "none" or b.rollout_logp is not None):
            roll = require(b.rollout_logp, "rollout_logp", "objective.rollout_is=token")
            metrics.update(mismatch_metrics(old, roll, keep, self.cfg.rollout_is_threshold))
            if self.cfg.rollout_is == "token":
                is_weight = token_is_weights(old, roll, self.cfg.rollout_is_threshold)
        s = StudentScores(
            keep=keep,
            logp=tl.label_logprob,
            entropy=tl.entropy,
            support_logp=tl.ids_logprob,
            support_teacher_logp=None if support is None else support[1],
            support_valid=None if support is None else support[2],
            is_weight=is_weight,
        )
        per_token = self.token_losses(b, s, metrics)
        self._support_metrics(s, metrics)
        weights = torch.where(keep, b.token_weight, torch.zeros_like(b.token_weight))
        metrics["objective/token_loss"] = masked_metric(per_token, keep)
        if self.on_policy and b.teacher_logp is not None:
            self.record(metrics, "teacher/reverse_kl", tl.label_logprob - b.teacher_logp, keep, b)
        if self.cfg.special_token_mask:
            metrics["mask/special_token_ratio"] = masked_metric((~unspecial).double(), response)
        if self.on_policy and self.cfg.rollout_rs != "none":
            metrics["rollout/rs_reject_frac"] = masked_metric((~keep).double(), unspecial)
        self._overlap_metric(b, keep, metrics)
        return ObjectiveOutput(aggregate(per_token, weights), metrics)

    @abc.abstractmethod
    def token_losses(self, batch: TokenBatch, scores: StudentScores, metrics: Metrics) -> Tensor:
        """Per-token losses ``L_t`` [N] (with grad); may add metrics."""

    # ---- shared pieces ----

    def _support(self, b: TokenBatch, keep: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """(ids, teacher log-probs, valid) [N, K'] of the declared support; masked rows all invalid."""
        kind = self.support_kind()
        if kind is None:
            return None
        ids = require(b.support_ids, "support_ids", f"objective {self.name}")
        teacher = require(b.support_teacher_logp, "support_teacher_logp", f"objective {self.name}")
        valid = torch.ones_like(ids, dtype=torch.bool) if b.support_valid is None else b.support_valid.bool()
        if kind == "teacher_topk+sampled":
            teacher_at_label = require(b.teacher_logp, "teacher_logp", "support teacher_topk+sampled")
            duplicate = ((ids == labels[:, None]) & valid).any(-1)
            ids = torch.cat([ids, labels[:, None]], dim=1)
            teacher = torch.cat([teacher, teacher_at_label[:, None].to(teacher.dtype)], dim=1)
            valid = torch.cat([valid, ~duplicate[:, None]], dim=1)
        valid = valid & keep[:, None] & (ids >= 0)
        return torch.where(valid, ids, torch.full_like(ids, -1)), teacher, valid

    def advantage_student_logp(self, b: TokenBatch, s: StudentScores) -> Tensor:
        """ℓ_S inside the advantage: sg(ℓ_S), or ℓ_old (``advantage_logp: old``, the G-OPD reference code)."""
        if self.cfg.advantage_logp == "old":
            return require(b.old_logp, "old_logp", "objective.advantage_logp=old")
        return s.logp.detach()

    def policy_gradient_loss(self, advantage: Tensor, b: TokenBatch, s: StudentScores, metrics: Metrics) -> Tensor:
        """§1 ``−A_t ℓ_S`` (or PPO-clip with ``r = exp(ℓ_S − ℓ_old)`` and verl's dual clip ``clip_ratio_c``)
        times the rollout-correction weight."""
        if not self.ppo_clip:
            return s.is_weight * policy_gradient_token_loss(s.logp, advantage)
        old = require(b.old_logp, "old_logp", "the PPO-clip loss (mini_batches_per_step > 1)")
        eps, cap = self.cfg.clip_ratio, self.cfg.clip_ratio_c
        loss = policy_gradient_token_loss(s.logp, advantage, old, eps, cap)
        ratio = torch.exp((s.logp.detach() - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        unclipped, clipped = -advantage * ratio, -advantage * ratio.clamp(1 - eps, 1 + eps)
        metrics["ppo/clip_frac"] = masked_metric((clipped > unclipped).double(), s.keep)
        if cap is not None:
            capped = (advantage < 0) & (torch.maximum(unclipped, clipped) > -advantage * cap)
            metrics["ppo/clip_frac_lower"] = masked_metric(capped.double(), s.keep)
        return s.is_weight * loss

    def record(self, metrics: Metrics, name: str, values: Tensor, keep: Tensor, b: TokenBatch) -> None:
        """Add ``name`` over ``keep``, and ``name/<teacher>`` for each teacher when there are several."""
        metrics[name] = masked_metric(values, keep)
        if len(self.teacher_names) > 1:
            index = require(b.teacher_index, "teacher_index", "per-teacher metrics of several teachers")
            for i, teacher in enumerate(self.teacher_names):
                metrics[f"{name}/{teacher}"] = masked_metric(values, keep & (index == i))

    def _support_metrics(self, s: StudentScores, metrics: Metrics) -> None:
        """``support/teacher_mass`` and ``support/student_mass``: ``Σ_{v∈K_t} p(v)`` of each model's
        full-vocabulary distribution on the support the objective uses (before renormalization)."""
        if s.support_logp is None or s.support_teacher_logp is None or s.support_valid is None:
            return
        rows = s.keep & s.support_valid.any(-1)
        for name, logp in (("teacher", s.support_teacher_logp), ("student", s.support_logp.detach())):
            on_support = torch.where(
                s.support_valid, logp.double(), torch.full_like(logp, -math.inf, dtype=torch.float64)
            )
            metrics[f"support/{name}_mass"] = masked_metric(on_support.logsumexp(-1).exp(), rows)

    def _overlap_metric(self, b: TokenBatch, keep: Tensor, metrics: Metrics) -> None:
        """``support/topk_overlap``: share of the teacher top-K that is in the student's top-K (same K)."""
        if b.teacher_topk_ids is not None:
            teacher_ids, valid = b.teacher_topk_ids, b.teacher_topk_ids >= 0
        elif b.support_ids is not None and self.support_kind() != "student_topk":
            teacher_ids, valid = b.support_ids, b.support_ids >= 0
            if b.support_valid is not None:
                valid = valid & b.support_valid.bool()
        else:
            return
        k = teacher_ids.shape[1]
        student_ids, _ = topk_logprobs(
            b.logits.detach(), k, temperature=self.temperature, tp_group=b.tp_group, vocab_start=b.vocab_start
        )
        hit = (teacher_ids[:, :, None] == student_ids[:, None, :]).any(-1) & valid
        share = hit.sum(-1).double() / valid.sum(-1).clamp(min=1).double()
        metrics["support/topk_overlap"] = masked_metric(share, keep & valid.any(-1))


def require(value: Tensor | None, field: str, why: str) -> Tensor:
    """``value``, or a ValueError naming the missing :class:`TokenBatch` field and what needs it."""
    if value is None:
        raise ValueError(f"TokenBatch.{field} is required by {why}; see Objective.requirements")
    return value
