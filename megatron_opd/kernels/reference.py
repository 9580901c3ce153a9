"""Materializing references over the *full* logits (tests and the benchmark's plain-torch baseline only; they build
a ``[N, V]`` tensor in ``dtype``, which is what production paths must never do — DESIGN "Key decisions").

Written the straightforward way (``log_softmax`` + ``gather`` / ``topk``, probabilities and ``xlogy`` for the
divergences) so that they are an independent check on the chunked, vocab-parallel and Triton implementations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_opd.kernels.logprobs import TokenLogprobs


def _gather_or_zero(logp: Tensor, cols: Tensor) -> Tensor:
    vals = logp.gather(1, cols.clamp(min=0))
    return torch.where(cols >= 0, vals, torch.zeros_like(vals))


def token_logprobs_reference(
    logits: Tensor, labels: Tensor, ids: Tensor | None = None, *, temperature: float = 1.0, dtype=torch.float64
) -> TokenLogprobs:
    """``log_softmax(logits.to(dtype) / temperature)`` over the full vocab, then gathers; differentiable."""
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)  # 0·log 0 = 0, with a zero gradient
    label = _gather_or_zero(logp, labels.unsqueeze(1)).squeeze(1)
    return TokenLogprobs(label, entropy, None if ids is None else _gather_or_zero(logp, ids))


def topk_logprobs_reference(
    logits: Tensor, k: int, *, temperature: float = 1.0, dtype=torch.float64
) -> tuple[Tensor, Tensor]:
    """``(ids, logprobs)`` of the k largest entries of the full-vocab ``log_softmax``, descending."""
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    values, ids = torch.topk(logp, k, dim=-1)
    return ids, values


def support_divergence_reference(
    student_logp: Tensor,
    teacher_logp: Tensor,
    beta: float,
    *,
    renormalize: bool = True,
    tail_bucket: bool = False,
    valid: Tensor | None = None,
    dtype=torch.float64,
) -> Tensor:
    """``D_β(P‖Q)`` in probability space: normalize by division, append ``1 - Σ p`` for the tail bucket."""
    q, p = student_logp.to(dtype).exp(), teacher_logp.to(dtype).exp()
    if valid is not None:
        q, p = q * valid, p * valid
    if renormalize:
        q = q / q.sum(-1, keepdim=True)
        p = p / p.sum(-1, keepdim=True)
    elif tail_bucket:
        q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], dim=-1)
        p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], dim=-1)

    def kl(a: Tensor, b: Tensor) -> Tensor:  # Σ a log(a / b), 0 where a = 0 (logs of 1 there: no 0/0 gradient)
        one = torch.ones_like(a)
        return (torch.xlogy(a, torch.where(a > 0, a, one)) - torch.xlogy(a, torch.where(a > 0, b, one))).sum(-1)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)
