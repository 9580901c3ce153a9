"""Sampled-token OPD, G-OPD and ExOPD (docs/objectives.md §1–§2), single- or multi-teacher.

``A_t = sg((ℓ_T − ℓ_S) + (λ−1)(ℓ_T − ℓ_R))``, ``L_t = −A_t ℓ_S(t)`` (PPO-clip form with several
mini-batches), times the rollout-correction weight (§6). λ = 1 (``opd``) never reads ℓ_R; ``exopd``
defaults to λ = 1.25. The reference is the student's initial weights or, for reward correction
(``reference: teacher_base``), each teacher's pre-RL base; multi-teacher batches carry each sample's
own ℓ_T (and ℓ_R), already routed by the trainer, and ``teacher_index`` for per-teacher metrics.
"""

from __future__ import annotations

from torch import Tensor

from megatron_opd.config.errors import ConfigError
from megatron_opd.objectives.base import Objective, StudentScores
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.inputs import TokenBatch, require
from megatron_opd.objectives.metrics import Metrics
from megatron_opd.objectives.reference import gopd_advantage


class GOPDObjective(Objective):
    """``gopd``: the reward scale λ (any λ > 0, default 1) and the reference model."""

    name = "gopd"
    policy_gradient = True
    takes_lambda = True

    @classmethod
    def validate_config(cls, cfg: ObjectiveConfig) -> None:
        if cls.lam(cfg) <= 0:
            raise ConfigError("objective.lambda", cls.lam(cfg), "must be > 0.", "λ=1 is OPD, λ>1 ExOPD (paper: 1.25).")

    def token_losses(self, batch: TokenBatch, scores: StudentScores, metrics: Metrics) -> Tensor:
        lam = self.lam(self.cfg)
        teacher = require(batch.teacher_logp, "teacher_logp", f"objective {self.name}")
        ref = require(batch.ref_logp, "ref_logp", f"objective {self.name} with λ = {lam}") if lam != 1.0 else None
        advantage = gopd_advantage(self.advantage_student_logp(batch, scores), teacher, ref, lam)
        self.record(metrics, "opd/advantage", advantage, scores.keep, batch)
        if ref is not None:
            self.record(metrics, "opd/reward", lam * (teacher - ref), scores.keep, batch)
        return self.policy_gradient_loss(advantage, batch, scores, metrics)


class OPDObjective(GOPDObjective):
    """``opd``: sampled-token OPD, λ = 1 (the reference cancels)."""

    name = "opd"

    @classmethod
    def validate_config(cls, cfg: ObjectiveConfig) -> None:
        super().validate_config(cfg)
        if cls.lam(cfg) != 1.0:
            raise ConfigError(
                "objective.lambda",
                cls.lam(cfg),
                "sampled-token OPD is λ = 1.",
                "use objective.name=gopd (any λ > 0) or exopd (λ > 1, default 1.25).",
            )


class ExOPDObjective(GOPDObjective):
    """``exopd``: reward extrapolation, λ > 1 (default 1.25, the ExOPD paper's)."""

    name = "exopd"
    default_lambda = 1.25
