"""Tolerances of a quantity computed two ways, as ``opd selftest`` states them (the test suite uses the same rules).

Two computations of one real quantity that differ in kernel, reduction order, batch shape, parallel layout or
precision round differently. They agree to some number of units in the last place (ulps) of the compared dtype at
the largest magnitude that enters them, so a tolerance is ``n`` ulps of a dtype at a magnitude, where ``n`` counts
the roundings that can differ, with margin. A fixed constant such as 1e-6 does not do this: it is a few fp32 ulps at
magnitude 4, and it passes or fails depending on the machine.
"""

from __future__ import annotations

import torch

# fp32 log-probs and entropies against float64 from the same logits: log p = z/T − lse rounds at the scale of
# max |z/T|; the running max, the tiled sums of exponentials (relative error ~ log2 V ulps), the log and the
# subtraction add a few ulps each, and tiles, chunks and TP shards only reorder them.
LOGPROB_ULPS = 32

# The same model's fp32 forward pass through another implementation, parallel layout or batch shape: each of the
# ~10 matmuls, norms and softmaxes of a layer may round in another order, a few ulps of its activations, and the
# differences add up over the layers (the test models have 2 to 4): 256 ulps of the largest |logit|. A backward
# pass doubles it.
FORWARD_ULPS = 256


def ulps(dtype: torch.dtype, magnitude: float | torch.Tensor, n: float) -> float:
    """``n`` units in the last place of ``dtype`` at ``magnitude`` (its machine epsilon × magnitude): an absolute
    tolerance. The magnitude is that of the largest number the compared results are computed from, which can
    exceed the results (log p close to 0 comes from logits of size 10)."""
    return n * torch.finfo(dtype).eps * float(magnitude)


def logit_scale(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """max |z / T| over the finite logits: the magnitude the kernels compute every value at."""
    finite = logits[torch.isfinite(logits)].double()
    return finite.abs().max().item() / temperature


def linear_logit_scale(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> float:
    """``logit_scale`` of the fused LM head's logits h Wᵀ (computed in float64)."""
    return logit_scale(hidden.double() @ weight.double().t(), temperature)


def logprob_atol(scale: float, logits_dtype: torch.dtype = torch.float32) -> float:
    """Tolerance of fp32 log-probs and entropies at logit scale ``scale``: ``LOGPROB_ULPS`` fp32 ulps of it.
    Logits a kernel computes itself in bf16/fp16 (the fused LM head) add one ulp of that dtype: an fp32
    accumulation on the other side of a rounding boundary moves a logit, and every log-prob with it, by one ulp."""
    atol = ulps(torch.float32, scale, LOGPROB_ULPS)
    return atol if logits_dtype == torch.float32 else atol + ulps(logits_dtype, scale, 1)


def logprob_grad_atol(grad_max: float, scale: float, dtype: torch.dtype) -> float:
    """Tolerance of a gradient w.r.t. logits returned in ``dtype``: a weighted sum of probabilities
    p = exp(z/T − lse), each off by ``LOGPROB_ULPS`` fp32 ulps of ``scale`` relative to itself, so
    ``LOGPROB_ULPS`` ulps of max |gradient| × scale; plus one ulp of ``dtype`` at max |gradient| (the final
    rounding) when that is not fp32."""
    atol = ulps(torch.float32, grad_max * scale, LOGPROB_ULPS)
    return atol if dtype == torch.float32 else atol + ulps(dtype, grad_max, 1)


def forward_atol(logits: torch.Tensor) -> float:
    """Tolerance of fp32 logits (or of values computed from them at their scale) from another forward pass:
    ``FORWARD_ULPS`` ulps of the largest |logit|."""
    return ulps(torch.float32, logits.abs().max(), FORWARD_ULPS)
