"""Tolerances for floating-point results computed two different ways.

Two computations of one real quantity that differ in batch shape, thread count, kernel, reduction order,
parallel layout or precision round differently. They agree to some number of units in the last place (ulps)
of the largest magnitude that enters them, so the tolerance is ``n`` ulps of the compared dtype at that
magnitude, where ``n`` counts the roundings that can differ, with margin. Each test says how it chose its
magnitude and ``n``. A fixed constant such as 1e-6 does not do this: it is a few ulps at magnitude 4, and it
passes or fails depending on the machine. Results of the same computation are compared bitwise instead.
"""

from __future__ import annotations

import torch


def ulps(dtype: torch.dtype, magnitude: float | torch.Tensor, n: float) -> float:
    """``n`` units in the last place of ``dtype`` at ``magnitude`` (its machine epsilon × magnitude): an absolute
    tolerance. The magnitude is that of the largest number the compared results are computed from, which can
    exceed the results (log p close to 0 comes from logits of size 10)."""
    return n * torch.finfo(dtype).eps * float(magnitude)


def logit_magnitude(model: torch.nn.Module, sequences: list[list[int]]) -> float:
    """The largest |logit| a causal LM gives over ``sequences``: the magnitude log-probs are computed from
    (log p = z − logsumexp(z) rounds at the scale of z, however close to 0 log p is)."""
    with torch.no_grad():
        return max(float(model(torch.tensor([s])).logits.abs().max()) for s in sequences)


# The same model's fp32 forward pass through another implementation, parallel layout or batch shape: each of the
# ~10 matmuls, norms and softmaxes of a layer may round in another order, a few ulps of its activations, and the
# differences add up over the layers (the test models have 2 to 4): 256 ulps of the largest |logit|. A backward
# pass doubles it.
FORWARD_ULPS = 256


def forward_atol(logits: torch.Tensor) -> float:
    """Tolerance of fp32 logits (or of values computed from them at their scale) from another forward pass."""
    return ulps(torch.float32, logits.abs().max(), FORWARD_ULPS)


def metric_atol(value: float, n: float) -> float:
    """``n`` fp32 ulps of a training metric (a loss, a gradient norm, an entropy: fp32 numbers of order 1 or more,
    reduced), at least of 1: a loss near 0 is still a difference of terms of order 1."""
    return ulps(torch.float32, max(1.0, abs(value)), n)
