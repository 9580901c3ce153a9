"""LSM, teacher top-K local support matching (docs/objectives.md §4; local-support-matching paper §4).

``L_t = Σ_{v∈K_t} p̂_S(v)(log p̂_S(v) − log p̂_T(v))``, the reverse KL with both distributions
renormalized on ``K_t``, its gradient taken analytically through ``p̂_S``. ``support``:
``teacher_topk`` (default), ``student_topk`` (the student's top-K under the rollout weights, scored by
the teacher), or ``teacher_topk+sampled`` (the sampled token ``y_t`` added, counted once).
Special-token masking (any objective, ``special_token_mask: true``) uses :func:`special_token_ids`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from megatron_opd.config.errors import ConfigError
from megatron_opd.kernels import support_divergence
from megatron_opd.objectives.base import Objective, StudentScores
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.inputs import TokenBatch
from megatron_opd.objectives.metrics import Metrics


class LSMObjective(Objective):
    """``lsm``: ``top_k``, ``support``; always β = 1 and renormalized."""

    name = "lsm"
    chooses_support = True
    default_beta = 1.0

    @classmethod
    def validate_config(cls, cfg: ObjectiveConfig) -> None:
        if cfg.beta is not None and cfg.beta != 1.0:
            raise ConfigError(
                "objective.beta",
                cfg.beta,
                "LSM is the truncated reverse KL (β = 1, docs/objectives.md §4).",
                "drop objective.beta, or use objective.name=gkd for another β on the teacher top-K.",
            )
        if not cfg.renormalize:
            raise ConfigError(
                "objective.renormalize",
                cfg.renormalize,
                "LSM requires renormalization on the support (docs/objectives.md §4: training collapses without it).",
                "set objective.renormalize=true; for the unrenormalized ablation use objective.name=gkd beta=1.",
            )

    def token_losses(self, batch: TokenBatch, scores: StudentScores, metrics: Metrics) -> Tensor:
        return support_divergence(
            scores.support_logp, scores.support_teacher_logp, 1.0, renormalize=True, valid=scores.support_valid
        )


def special_token_ids(tokenizer: Any, keep_ids: Iterable[int] | None = None) -> list[int]:
    """§4 default masked set: the tokenizer's special and added tokens, except ``keep_ids``
    (default: the EOS the student is meant to emit, ``tokenizer.eos_token_id``)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    ids |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    if keep_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        keep_ids = [] if eos is None else [eos]
    return sorted(ids - {int(i) for i in keep_ids})
