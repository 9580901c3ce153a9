"""Loss aggregation over the global batch (docs/objectives.md, Notation).

``token-mean``: ``Σ_t M_t L_t / Σ_t M_t`` over every token of the step (all micro-batches, all DP
ranks). ``seq-mean-token-mean``: the mean over sequences of each sequence's token mean.

The trainer computes the global counts once per step (:func:`local_counts` on every micro-batch's
final mask, summed by :func:`global_counts` over micro-batches and the DP group), then gives each
micro-batch the token weights :func:`token_weights`; a micro-batch's loss is ``Σ_t w_t L_t``, so
the micro-batch losses of all micro-batches and DP ranks add up to the global loss. Sequences are
never split across micro-batches (``seq_index`` need only be unique within a micro-batch).
With Megatron's DDP, which averages gradients over DP, scale the loss by the DP size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean")


@dataclasses.dataclass(frozen=True)
class GlobalCounts:
    """Counts over the whole step: loss tokens ``Σ M_t`` and sequences with at least one."""

    tokens: float
    sequences: float


def per_sequence_sum(values: Tensor, seq_index: Tensor) -> Tensor:
    """``Σ values`` over each token's sequence, broadcast back to the tokens [N]."""
    _, inverse = torch.unique(seq_index, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=values.dtype, device=values.device)
    return sums.index_add_(0, inverse, values)[inverse]


def local_counts(mask: Tensor, seq_index: Tensor) -> Tensor:
    """[tokens, sequences] of one micro-batch's final loss mask, float64 [2]."""
    keep = mask > 0
    sequences = torch.unique(seq_index[keep]).numel()
    return torch.tensor([float(keep.sum()), float(sequences)], dtype=torch.float64, device=mask.device)


def global_counts(counts: Iterable[Tensor], group: dist.ProcessGroup | None = None) -> GlobalCounts:
    """Sum :func:`local_counts` of this rank's micro-batches, then over ``group`` (None: no collective)."""
    total = torch.stack(list(counts)).sum(0)
    if group is not None:
        dist.all_reduce(total, group=group)
    return GlobalCounts(tokens=float(total[0]), sequences=float(total[1]))


def token_weights(
    mask: Tensor, seq_index: Tensor, counts: GlobalCounts, mode: str, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per-token weights ``w_t`` [N] (0 where ``mask`` is 0) so that ``Σ_t w_t L_t`` over the step is
    the ``mode`` aggregate."""
    m = (mask > 0).to(torch.float64)
    if mode == "token-mean":
        w = m / max(counts.tokens, 1.0)
    elif mode == "seq-mean-token-mean":
        lengths = per_sequence_sum(m, seq_index)
        w = m / (lengths.clamp(min=1.0) * max(counts.sequences, 1.0))
    else:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; use one of {AGG_MODES}")
    return w.to(dtype)


def aggregate(per_token: Tensor, weights: Tensor) -> Tensor:
    """``Σ_t w_t L_t``; tokens of weight 0 are skipped even where ``L_t`` is not finite."""
    live = weights != 0
    return (torch.where(live, per_token, torch.zeros_like(per_token)) * weights.to(per_token.dtype)).sum()
