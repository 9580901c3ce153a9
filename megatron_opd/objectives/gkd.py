"""GKD / generalized JSD on the teacher top-K (docs/objectives.md §5; Agarwal et al. 2024).

``L_t = D_β(P ‖ Q)`` with P = teacher, Q = student on ``K_t = TopK(π_T)``: β = 0 forward KL, β = 1
reverse KL, else ``β KL(P‖M) + (1−β) KL(Q‖M)``, ``M = βP + (1−β)Q``. ``renormalize: true`` renormalizes
both on ``K_t``; ``false`` uses the raw sub-distributions, with ``tail_bucket`` adding ``1 − Σ_K`` as one
entry. The full-vocabulary divergence exists only in ``reference.jsd_token_loss`` (never in production).
"""

from __future__ import annotations

from torch import Tensor

from megatron_opd.kernels import support_divergence
from megatron_opd.objectives.base import Objective, StudentScores
from megatron_opd.objectives.inputs import TokenBatch
from megatron_opd.objectives.metrics import Metrics


class GKDObjective(Objective):
    """``gkd``: β (default 0), ``top_k``, ``renormalize``, ``tail_bucket``."""

    name = "gkd"
    support = "teacher_topk"

    def token_losses(self, batch: TokenBatch, scores: StudentScores, metrics: Metrics) -> Tensor:
        cfg = self.cfg
        return support_divergence(
            scores.support_logp,
            scores.support_teacher_logp,
            self.divergence_beta(cfg),
            renormalize=cfg.renormalize,
            tail_bucket=cfg.tail_bucket,
            valid=scores.support_valid,
        )
