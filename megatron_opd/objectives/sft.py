"""SFT / SeqKD (docs/objectives.md §7): cross-entropy ``L_t = −ℓ_S(t)`` on teacher-generated responses (off-policy)."""

from __future__ import annotations

from torch import Tensor

from megatron_opd.objectives.base import Objective, StudentScores
from megatron_opd.objectives.inputs import TokenBatch
from megatron_opd.objectives.metrics import Metrics


class SFTObjective(Objective):
    """``sft``: no teacher scores, no rollout correction."""

    name = "sft"
    on_policy = False

    def token_losses(self, batch: TokenBatch, scores: StudentScores, metrics: Metrics) -> Tensor:
        return -scores.logp
