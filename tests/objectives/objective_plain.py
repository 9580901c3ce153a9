"""Independent float64 formulas of docs/objectives.md, one row (token) at a time, written from the sheet
and sharing no code with ``megatron_opd.objectives``. Gradients come from autograd through these."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = -math.inf


def log_softmax_row(z: Tensor) -> Tensor:
    z = z.double()
    top = z.max()
    return z - (top + torch.log(torch.exp(z - top).sum()))


def kl(lp: list[Tensor], lq: list[Tensor]) -> Tensor:
    """Σ_i p_i (log p_i − log q_i) over entries with p_i > 0."""
    total = torch.zeros((), dtype=torch.float64)
    for a, b in zip(lp, lq):
        if float(a) > NEG_INF:
            total = total + torch.exp(a) * (a - b)
    return total


def d_beta(lp: list[Tensor], lq: list[Tensor], beta: float) -> Tensor:
    """§5 D_β(P‖Q) with P = teacher (lp), Q = student (lq)."""
    if beta == 0.0:
        return kl(lp, lq)
    if beta == 1.0:
        return kl(lq, lp)
    lm = []
    for a, b in zip(lp, lq):
        if float(a) == NEG_INF and float(b) == NEG_INF:
            lm.append(torch.tensor(NEG_INF, dtype=torch.float64))
        else:
            lm.append(torch.log(beta * torch.exp(a) + (1.0 - beta) * torch.exp(b)))
    return beta * kl(lp, lm) + (1.0 - beta) * kl(lq, lm)


def on_support(lp_row: Tensor, ids: list[int], renormalize: bool, tail: bool = False) -> list[Tensor]:
    """Log-probs of a full row restricted to ``ids``: renormalized, raw, or raw plus the tail mass."""
    vals = [lp_row[i] for i in ids]
    if renormalize:
        norm = torch.log(sum(torch.exp(v) for v in vals))
        return [v - norm for v in vals]
    if tail:
        rest = 1.0 - sum(torch.exp(v) for v in vals)
        vals = [*vals, torch.log(rest) if float(rest) > 0 else torch.tensor(NEG_INF, dtype=torch.float64)]
    return vals


def topk_list(row: Tensor, k: int) -> list[int]:
    order = sorted(range(row.numel()), key=lambda i: -float(row[i]))
    return order[:k]


def entropy_row(z: Tensor) -> Tensor:
    lp = log_softmax_row(z)
    return -sum(torch.exp(v) * v for v in lp if v.item() > NEG_INF)


def rollout_weight(log_ratio: float, threshold: float) -> float:
    """§6 w = min(exp(ℓ_old − ℓ_roll), C), the log-ratio first clamped to [−20, 20] (verl)."""
    return min(math.exp(min(max(log_ratio, -20.0), 20.0)), threshold)


def pg_loss(ls: Tensor, adv: float, old: float | None, clip: float | None, clip_c: float | None = None) -> Tensor:
    """−A ℓ_S, or the PPO-clip form with r = exp(ℓ_S − ℓ_old) (log-ratio clamped to [−20, 20]) and, for
    A < 0, verl's dual clip: the loss capped at −A·clip_c."""
    if old is None:
        return -adv * ls
    r = torch.exp(torch.clamp(ls - old, -20.0, 20.0))
    loss = torch.maximum(-adv * r, -adv * r.clamp(1.0 - clip, 1.0 + clip))
    if clip_c is not None and adv < 0:
        loss = torch.minimum(loss, torch.tensor(-adv * clip_c, dtype=torch.float64))
    return loss


def gjsd_row(zs: Tensor, zt: Tensor, beta: float, top_k: int | None, renormalize: bool, tail: bool) -> Tensor:
    ps, pt = log_softmax_row(zs), log_softmax_row(zt)
    if top_k is None:
        return d_beta(list(pt), list(ps), beta)
    ids = topk_list(zt, top_k)
    return d_beta(on_support(pt, ids, renormalize, tail), on_support(ps, ids, renormalize, tail), beta)


def lsm_row(zs: Tensor, zt: Tensor, label: int, top_k: int, support: str) -> Tensor:
    if support == "teacher_topk":
        ids = topk_list(zt, top_k)
    elif support == "student_topk":
        ids = topk_list(zs, top_k)
    else:
        ids = topk_list(zt, top_k)
        if label not in ids:
            ids.append(label)
    ps, pt = log_softmax_row(zs), log_softmax_row(zt)
    return kl(on_support(ps, ids, True), on_support(pt, ids, True))


def aopd_row(
    zs: Tensor,
    zt: Tensor,
    label: int,
    top_k: int,
    tau: float,
    beta: float,
    *,
    variant: str = "default",
    reward: float = 0.0,
    tol: float = 1e-3,
    is_weight: float = 1.0,
    old: float | None = None,
    clip: float | None = None,
    clip_c: float | None = None,
    adv_logp: float | None = None,
    renormalize: bool = True,
    tail: bool = False,
) -> tuple[Tensor, bool]:
    """AOPD loss of one token and whether it intervened."""
    ls = log_softmax_row(zs)[label]
    lt = float(log_softmax_row(zt)[label])
    s_for_adv = float(ls) if adv_logp is None else adv_logp
    adv = lt - s_for_adv
    if variant == "zero":
        m = abs(adv) <= tol
    else:
        m = tau > -1.0 and math.exp(lt) - math.exp(s_for_adv) <= tau
        if variant == "accuracy_filtered":
            m = m and reward <= 0
    if m:
        return gjsd_row(zs, zt, beta, top_k, renormalize, tail), True
    return is_weight * pg_loss(ls, adv, old, clip, clip_c), False
