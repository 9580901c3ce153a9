"""The objective interface the trainer calls (docs/objectives.md §1–§6).

Per micro-batch the trainer hands over a :class:`~megatron_opd.objectives.inputs.TokenBatch`: the student's
logits shard ``[N, V_local]`` (with grad) — or, with the fused LM head, the rows ``[N, H]`` its output layer reads
and that layer's weight shard, so that no logits tensor exists —, labels ``y_t``, the masks, and the scores the objective's
:class:`~megatron_opd.objectives.inputs.Requirements` ask for (teacher/reference/old/rollout log-probs at
``y_t``, a top-K support with the teacher's log-probs on it). Calling the objective returns an
:class:`ObjectiveOutput`: this micro-batch's scalar loss ``Σ_t w_t L_t`` (``w_t`` from
``aggregation.token_weights``) and metrics as (sum, count) pairs.

The vocabulary-sized work is one pass of the student's kernels (``TokenBatch.student_logprobs``: one fused pass
over the logits shard — or over ``hidden @ W_shardᵀ`` one chunk at a time — forward, one backward; ``ℓ_S``, entropy and the student's log-probs on the support), plus a
forward-only top-K for the top-K overlap metric; the rest is [N] / [N, K] torch math. No [N, V] fp32 tensor is
built.

What distinguishes one objective from another is declared on its class: whether it trains on its own rollouts,
has a policy-gradient term, compares on a support (and whether ``objective.support`` chooses it), takes the
reward scale λ and its default, its default β, and the constraints it puts on the config
(:meth:`Objective.validate_config`). ``registry.OBJECTIVES`` maps ``objective.name`` to the class.

Masks: ``response_mask`` marks response tokens; :meth:`Objective.loss_mask` removes special tokens (§4)
and rollout-rejected tokens (§6) to give the final ``M_t``. The trainer counts tokens/sequences of that
final mask over the whole step (``aggregation.local_counts``/``global_counts``) before computing weights.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.objectives.aggregation import aggregate
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.inputs import Requirements, ScoredSample, TokenBatch, require, token_batch
from megatron_opd.objectives.metrics import Metrics, masked_metric
from megatron_opd.objectives.reference import LOG_RATIO_BOUND, policy_gradient_token_loss
from megatron_opd.objectives.rollout_correction import mismatch_metrics, rejection_keep, token_is_weights


@dataclasses.dataclass
class ObjectiveOutput:
    """``loss``: scalar with grad, ``Σ_t w_t L_t`` of this micro-batch. ``metrics``: (sum, count) pairs."""

    loss: Tensor
    metrics: Metrics


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
    term and the common metrics. Subclasses declare their facts below and implement :meth:`token_losses`
    (the per-token ``L_t``)."""

    name: ClassVar[str]  # objective.name
    on_policy: ClassVar[bool] = True  # trains on student rollouts (False: SFT on teacher text)
    policy_gradient: ClassVar[bool] = False  # has a −A_t ℓ_S(t) term, which rollout correction and PPO-clip apply to
    support: ClassVar[str | None] = None  # the support of §3–§5 it compares on (None: none)
    chooses_support: ClassVar[bool] = False  # objective.support chooses the support instead
    takes_lambda: ClassVar[bool] = False  # reads the reward scale λ (objective.lambda) of §2
    default_lambda: ClassVar[float] = 1.0  # λ when objective.lambda is unset
    default_beta: ClassVar[float] = 0.0  # β of §5 when objective.beta is unset

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
        self.masked_token_ids = torch.tensor(sorted({int(i) for i in masked_token_ids}), dtype=torch.int64)
        self.ppo_clip = ppo_clip
        self.temperature = temperature
        self.teacher_names = tuple(teacher_names)

    # ---- facts of the objective under a config ----

    @classmethod
    def support_kind(cls, cfg: ObjectiveConfig) -> str | None:
        """None, or the support of §3–§5: teacher_topk | student_topk | teacher_topk+sampled."""
        return cfg.support if cls.chooses_support else cls.support

    @classmethod
    def lam(cls, cfg: ObjectiveConfig) -> float:
        """λ of §2 with the objective's default."""
        return cfg.lambda_ if cfg.lambda_ is not None else cls.default_lambda

    @classmethod
    def divergence_beta(cls, cfg: ObjectiveConfig) -> float:
        """β of §5 with the objective's default."""
        return cfg.beta if cfg.beta is not None else cls.default_beta

    @classmethod
    def needs_reference(cls, cfg: ObjectiveConfig) -> bool:
        """The reference model is computed only where it does not cancel (§2: λ ≠ 1)."""
        return cls.takes_lambda and cls.lam(cfg) != 1.0

    @classmethod
    def needs_outcome_reward(cls, cfg: ObjectiveConfig) -> bool:
        """The loss reads each trajectory's outcome reward."""
        return False

    @classmethod
    def validate_config(cls, cfg: ObjectiveConfig) -> None:
        """Raise a ConfigError where ``cfg`` breaks a constraint of this objective (after the keys' domains
        and their use by this objective are checked: ``registry.validate_objective``). None by default."""
        return None

    # ---- what the trainer must supply ----

    @property
    def requirements(self) -> Requirements:
        cfg, kind = self.cfg, self.support_kind(self.cfg)
        rs = self.on_policy and cfg.rollout_rs != "none"
        return Requirements(
            teacher_logp=self.on_policy,
            reference=cfg.reference if self.needs_reference(cfg) else None,
            old_logp=rs or (self.policy_gradient and (self.ppo_clip or cfg.advantage_logp == "old")),
            rollout_logp=self.on_policy and (cfg.rollout_is != "none" or rs),
            support=None if kind is None else kind.removesuffix("+sampled"),
            top_k=cfg.top_k if kind is not None else 0,
            outcome_reward=self.needs_outcome_reward(cfg),
        )

    def token_batch(
        self, samples: Sequence[ScoredSample], labels: Tensor, seq_index: Tensor, tp_group: ProcessGroup | None
    ) -> TokenBatch:
        """The token batch of a micro-batch's scored samples, as this objective reads it."""
        return token_batch(
            samples,
            labels,
            seq_index,
            support=self.requirements.support,
            teacher_names=self.teacher_names,
            tp_group=tp_group,
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
        tl = b.student_logprobs(labels, None if support is None else support[0], self.temperature)
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
        token_weight = require(b.token_weight, "token_weight", "the loss (set by the trainer)")
        weights = torch.where(keep, token_weight, torch.zeros_like(token_weight))
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
        kind = self.support_kind(self.cfg)
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
        elif b.support_ids is not None and self.support_kind(self.cfg) != "student_topk":
            teacher_ids, valid = b.support_ids, b.support_ids >= 0
            if b.support_valid is not None:
                valid = valid & b.support_valid.bool()
        else:
            return
        student_ids = b.student_topk(teacher_ids.shape[1], self.temperature)
        hit = (teacher_ids[:, :, None] == student_ids[:, None, :]).any(-1) & valid
        share = hit.sum(-1).double() / valid.sum(-1).clamp(min=1).double()
        metrics["support/topk_overlap"] = masked_metric(share, keep & valid.any(-1))
