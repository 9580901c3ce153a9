"""Token-level rollout correction (docs/objectives.md §6; Liu et al. 2025, "When speed kills stability").

The rollout engine's log-probs ``ℓ_roll`` differ from the trainer's ``ℓ_old`` on the same weights.
``rollout_is: token`` multiplies each policy-gradient token loss by ``w_t = sg(min(exp(ℓ_old − ℓ_roll), C))``
(the log-ratio clamped to ±20 before ``exp``, as verl does); ``rollout_rs`` rejects (masks) tokens or whole sequences whose ratio leaves ``[lower, upper]``
(sequence ratio ``exp Σ_t (ℓ_old − ℓ_roll)``). Ratios are compared in log space, so nothing overflows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_opd.objectives.aggregation import per_sequence_sum
from megatron_opd.objectives.metrics import Metrics, masked_metric
from megatron_opd.objectives.reference import LOG_RATIO_BOUND


def token_is_weights(old_logp: Tensor, rollout_logp: Tensor, threshold: float) -> Tensor:
    """``w_t = sg(min(exp(clamp(ℓ_old − ℓ_roll, ±20)), C))`` [N] (verl's log-ratio bound before ``exp``)."""
    upper = min(math.log(threshold), LOG_RATIO_BOUND)
    return torch.exp((old_logp - rollout_logp).detach().clamp(min=-LOG_RATIO_BOUND, max=upper))


def rejection_keep(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, seq_index: Tensor, mode: str, lower: float, upper: float
) -> Tensor:
    """Bool [N]: tokens kept by ``rollout_rs`` (``token``: per-token ratio; ``sequence``: the ratio of
    the token's whole sequence over its ``mask`` tokens) inside ``[lower, upper]``."""
    log_ratio = (old_logp - rollout_logp).detach()
    if mode == "sequence":
        live = mask > 0
        log_ratio = per_sequence_sum(torch.where(live, log_ratio, torch.zeros_like(log_ratio)), seq_index)
    elif mode != "token":
        raise ValueError(f"unknown rollout_rs {mode!r}; use token or sequence")
    return (log_ratio >= math.log(lower)) & (log_ratio <= math.log(upper))


def mismatch_metrics(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, threshold: float) -> Metrics:
    """``rollout/mismatch_kl`` = mean(ℓ_roll − ℓ_old) and ``rollout/is_clip_frac`` = share of tokens
    whose ratio exceeds ``C``, over ``mask``."""
    log_ratio = (old_logp - rollout_logp).detach()
    return {
        "rollout/mismatch_kl": masked_metric(-log_ratio, mask),
        "rollout/is_clip_frac": masked_metric((log_ratio > math.log(threshold)).double(), mask),
    }
