"""The divergence family ``D_β(P_teacher ‖ Q_student)`` on a K-entry support (docs/objectives.md §5; AOPD §3, LSM §4,
GKD): per-row values from full-vocab-normalized log-probs ``[N, K]``, differentiable through ``student_logp`` (which
:func:`megatron_opd.kernels.token_logprobs` returns with its gradient path into the logits shard), and its float64
reference in probability space.

Everything is in log space and guarded so that -inf entries (zero probability, masked or padded ids) contribute
exactly 0 and never a NaN gradient: masked values are replaced *before* any op whose backward could divide by zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TAIL_FLOOR = 1e-12  # smallest tail-bucket probability: keeps log(1 - Σ_K p) and its gradient finite
LOG_FLOOR = -1e4  # log q below this counts as this in KL(p‖q) where p > 0: a huge but finite value and gradient


def _kl(a: Tensor, b: Tensor) -> Tensor:
    """``Σ exp(a)·(a - b)`` over the last dim; entries with ``a = -inf`` contribute 0 (and no gradient), and
    ``b`` is floored at ``LOG_FLOOR`` (``a > 0 = b`` would be +inf, and 0·inf = NaN in any masked loss)."""
    dead = a == -math.inf
    a_s, b_s = a.masked_fill(dead, 0.0), b.masked_fill(dead, 0.0).clamp(min=LOG_FLOOR)
    return torch.where(dead, torch.zeros_like(a_s), a_s.exp() * (a_s - b_s)).sum(-1)


def _logsumexp(a: Tensor) -> Tensor:
    """``log Σ exp(a)`` over the last dim, keepdim; -inf for rows that are all -inf (with a zero, not NaN, grad)."""
    dead = (a == -math.inf).all(-1, keepdim=True)
    return torch.logsumexp(a.masked_fill(dead, 0.0), -1, keepdim=True).masked_fill(dead, -math.inf)


def _renormalize(a: Tensor) -> Tensor:
    """``a - log Σ exp(a)``; rows that are all -inf stay -inf."""
    lse = _logsumexp(a)
    return a - lse.masked_fill(lse == -math.inf, 0.0)


def _with_tail(a: Tensor) -> Tensor:
    """Append ``log(1 - Σ exp(a))``, the probability outside the support, as one more entry."""
    tail = torch.log((-torch.expm1(_logsumexp(a).clamp(max=0.0))).clamp(min=TAIL_FLOOR))
    return torch.cat([a, tail], dim=-1)


def support_divergence(
    student_logp: Tensor,
    teacher_logp: Tensor,
    beta: float,
    *,
    renormalize: bool = True,
    tail_bucket: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """``D_β(P ‖ Q)`` per row ``[N]`` on the support given by the K columns (docs/objectives.md §5).

    ``student_logp``/``teacher_logp`` ``[N, K]`` are full-vocab-normalized log-probs at the same ids. ``renormalize``:
    both renormalized on the support; else, with ``tail_bucket``, one extra entry ``log(1 - Σ_K p)`` per side; else
    the sub-distributions as given. ``valid [N, K]`` (bool) drops padded/duplicate entries. ``beta = 0`` is
    ``KL(P‖Q)``, ``beta = 1`` is ``KL(Q‖P)``, in between ``β·KL(P‖M) + (1-β)·KL(Q‖M)`` with ``M = βP + (1-β)Q``.
    """
    if student_logp.dim() != 2 or student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student_logp/teacher_logp of shapes {tuple(student_logp.shape)} / {tuple(teacher_logp.shape)}: must "
            "both be [N, K]; pass log-probs at the same K support ids for student and teacher."
        )
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta={beta!r}: must be in [0, 1]; 0 = forward KL(P||Q), 1 = reverse KL(Q||P).")
    if renormalize and tail_bucket:
        raise ValueError("tail_bucket=True: only applies without renormalization; set renormalize=False or drop it.")
    if valid is not None and valid.dtype != torch.bool:
        raise TypeError(f"valid of dtype {valid.dtype}: must be a bool mask shaped like the log-probs.")
    if valid is not None and valid.shape != student_logp.shape:
        raise ValueError(f"valid of shape {tuple(valid.shape)}: must be shaped like the log-probs.")
    up = torch.promote_types(student_logp.dtype, torch.float32)
    logq, logp = student_logp.to(up), teacher_logp.to(up)
    if valid is not None:
        logq, logp = logq.masked_fill(~valid, -math.inf), logp.masked_fill(~valid, -math.inf)
    if renormalize:
        logq, logp = _renormalize(logq), _renormalize(logp)
    elif tail_bucket:
        logq, logp = _with_tail(logq), _with_tail(logp)
    beta = float(beta)
    if beta == 0.0:
        return _kl(logp, logq)
    if beta == 1.0:
        return _kl(logq, logp)
    both_dead = (logp == -math.inf) & (logq == -math.inf)
    logm = torch.logaddexp(
        logp.masked_fill(both_dead, 0.0) + math.log(beta), logq.masked_fill(both_dead, 0.0) + math.log1p(-beta)
    )
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


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
    """:func:`support_divergence` in probability space (tests only): normalize by division, append ``1 - Σ p`` for
    the tail bucket, ``xlogy`` for the KLs."""
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
