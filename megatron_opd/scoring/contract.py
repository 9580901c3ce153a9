"""What scoring is asked for and what it returns, per source (the student under the rollout weights, the
sample's teacher, its reference model).

The objective's :class:`~megatron_opd.objectives.inputs.Requirements` turns into a :class:`ScoringPlan`:
one :class:`ScoreRequest` per source that must score (``None``: that source does not run). Every scoring
pass returns, per sample, one :class:`TokenScores` (per response token, at the rollout temperature); the
sample keeps them by source in its :class:`SampleScores`, and the objectives package reads its token batch
from those (``objectives.inputs.token_batch``). Nothing here knows an objective.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """What one scoring pass computes per response token besides ``logp``, the sampled token's log-prob."""

    top_k: int = 0  # the model's own top-K ids and log-probs (0: none)
    at_ids: bool = False  # log-probs at ids given per sample (the teacher at the student's top-K)


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """Which sources score, and what each computes. ``teacher.at_ids``: the teacher scores each sample at its
    student's top-K ids (``SampleScores.student.topk_ids``), so the student scores first."""

    student: ScoreRequest | None  # ℓ_old (and the student top-K) under the rollout weights
    teacher: ScoreRequest  # ℓ_T from each sample's own teacher
    reference: ScoreRequest | None  # ℓ_R from the sample's reference


@dataclasses.dataclass
class TokenScores:
    """One model's scores of one sample's response tokens (``R`` of them), at the rollout temperature."""

    logp: Tensor  # [R] log-prob of the sampled token
    topk_ids: Tensor | None = None  # [R, K] the model's own top-K ids
    topk_logp: Tensor | None = None  # [R, K] their log-probs
    ids_logp: Tensor | None = None  # [R, K'] log-probs at the requested ids

    def split(self, lengths: list[int]) -> list[TokenScores]:
        """Scores of consecutive samples (``lengths`` response tokens each), one :class:`TokenScores` per sample,
        each in storage of its own."""

        def parts(t: Tensor | None) -> list[Tensor | None]:
            return [None] * len(lengths) if t is None else [p.clone() for p in t.split(lengths, dim=0)]

        return [
            TokenScores(*fields)
            for fields in zip(parts(self.logp), parts(self.topk_ids), parts(self.topk_logp), parts(self.ids_logp))
        ]

    def tensors(self) -> tuple[Tensor, ...]:
        """The log-prob tensors present (``-inf`` is a legitimate entry of the top-K and ids lists only)."""
        return tuple(t for t in (self.logp, self.topk_logp, self.ids_logp) if t is not None)


@dataclasses.dataclass
class SampleScores:
    """What scoring returned for one sample, by source (``None``: that source did not score it)."""

    student: TokenScores | None = None
    teacher: TokenScores | None = None
    reference: TokenScores | None = None
