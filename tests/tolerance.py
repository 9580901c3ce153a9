"""Tolerances for floating-point results computed two different ways.

The rules are ``megatron_opd.selftest.tolerance``'s (``opd selftest`` states its tolerances with them): ``n``
ulps of the compared dtype at the largest magnitude that enters the results, where ``n`` counts the roundings that
can differ, with margin. Each test says how it chose its magnitude and ``n``. Results of the same computation are
compared bitwise instead. Here: the magnitudes of models and metrics that only tests need.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_opd.selftest.tolerance import FORWARD_ULPS, forward_atol, ulps

__all__ = ["FORWARD_ULPS", "float64_approx", "forward_atol", "logit_magnitude", "metric_atol", "ulps"]


def logit_magnitude(model: torch.nn.Module, sequences: list[list[int]]) -> float:
    """The largest |logit| a causal LM gives over ``sequences``: the magnitude log-probs are computed from
    (log p = z − logsumexp(z) rounds at the scale of z, however close to 0 log p is)."""
    with torch.no_grad():
        return max(float(model(torch.tensor([s])).logits.abs().max()) for s in sequences)


def float64_approx(want: float, magnitude: float, n: int) -> Any:
    """``pytest.approx(want)`` within ``n`` float64 ulps of ``magnitude``: Python arithmetic on the same numbers in
    another order or form, one rounding per operation at the size of the largest operand (``magnitude``; the value
    itself for products and quotients of positive numbers)."""
    return pytest.approx(want, rel=0, abs=ulps(torch.float64, abs(magnitude), n))


def metric_atol(value: float, n: float) -> float:
    """``n`` fp32 ulps of a training metric (a loss, a gradient norm, an entropy: fp32 numbers of order 1 or more,
    reduced), at least of 1: a loss near 0 is still a difference of terms of order 1."""
    return ulps(torch.float32, max(1.0, abs(value)), n)
