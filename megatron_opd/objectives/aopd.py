"""AOPD, asymmetric on-policy distillation (docs/objectives.md §3; AOPD paper §5).

``L_t = (1 − m_t)(−A_t ℓ_S(t)) + m_t D_β(p̂_T ‖ p̂_S)`` on the teacher top-K ``K_t`` (renormalized, or
raw / with a tail bucket when ``renormalize: false``), ``A_t = sg(ℓ_T − ℓ_S)``, intervention
``m_t = 1[p_T(y_t) − p_S(y_t) ≤ τ]`` (τ = −1: never, = OPD; τ = 1: always, = top-K GKD). Variants:
``zero`` intervenes where ``|A_t| ≤ aopd_zero_tolerance``; ``accuracy_filtered`` only on trajectories
with outcome reward ≤ 0. The policy-gradient branch gets rollout correction and PPO-clip like OPD.
Metric ``aopd/intervention_ratio = Σ m_t M_t / Σ M_t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_opd.kernels import support_divergence
from megatron_opd.objectives.base import Objective, StudentScores
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.inputs import TokenBatch, require
from megatron_opd.objectives.metrics import Metrics
from megatron_opd.objectives.reference import aopd_intervention, gopd_advantage


class AOPDObjective(Objective):
    """``aopd``: τ, β (default 0, forward KL), ``aopd_variant``, ``top_k``."""

    name = "aopd"
    policy_gradient = True
    support = "teacher_topk"

    @classmethod
    def needs_outcome_reward(cls, cfg: ObjectiveConfig) -> bool:
        return cfg.aopd_variant == "accuracy_filtered"

    def token_losses(self, batch: TokenBatch, scores: StudentScores, metrics: Metrics) -> Tensor:
        cfg = self.cfg
        teacher = require(batch.teacher_logp, "teacher_logp", "objective aopd")
        student = self.advantage_student_logp(batch, scores)
        advantage = gopd_advantage(student, teacher, None, 1.0)
        reward = batch.outcome_reward
        if cfg.aopd_variant == "accuracy_filtered":
            reward = require(reward, "outcome_reward", "objective.aopd_variant=accuracy_filtered")
        intervene = aopd_intervention(student, teacher, cfg.tau, cfg.aopd_variant, reward, cfg.aopd_zero_tolerance)
        intervene = intervene & scores.keep
        guide = support_divergence(
            scores.support_logp,
            scores.support_teacher_logp,
            self.divergence_beta(cfg),
            renormalize=cfg.renormalize,
            tail_bucket=cfg.tail_bucket,
            valid=scores.support_valid,
        )
        pg = self.policy_gradient_loss(advantage, batch, scores, metrics)
        self.record(metrics, "opd/advantage", advantage, scores.keep, batch)
        self.record(metrics, "aopd/intervention_ratio", intervene.double(), scores.keep, batch)
        return torch.where(intervene, guide, pg)
