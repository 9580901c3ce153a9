"""The objectives of docs/objectives.md written plainly on full-vocabulary logits, one process.

For tests and for reading: every function takes ``*_logits`` [N, V] (already divided by the scoring
temperature), ``labels`` [N] int64 (the sampled tokens ``y_t``) and returns per-token values [N].
They build [N, V] tensors freely; the production objectives (``opd``, ``aopd``, ``lsm``, ``gkd``,
``sft``) compute the same numbers vocab-parallel without doing so. The [N]-sized formulas here
(``gopd_advantage``, ``policy_gradient_token_loss``) are shared with the production path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _log_softmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def token_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """``log p(y_t)`` under ``log_softmax(logits)``."""
    return _log_softmax(logits).gather(-1, labels[:, None]).squeeze(-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Full-vocabulary entropy ``−Σ_v p(v) log p(v)`` (0 · log 0 = 0)."""
    logp = _log_softmax(logits)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def gopd_advantage(student_logp: Tensor, teacher_logp: Tensor, ref_logp: Tensor | None, lam: float) -> Tensor:
    """§2: ``A_t = sg((ℓ_T − ℓ_S) + (λ−1)(ℓ_T − ℓ_R))``; λ = 1 is OPD (§1) and never reads ``ref_logp``."""
    advantage = teacher_logp - student_logp
    if lam != 1.0:
        if ref_logp is None:
            raise ValueError(f"λ = {lam} needs the reference log-probs ℓ_R (docs/objectives.md §2)")
        advantage = advantage + (lam - 1.0) * (teacher_logp - ref_logp)
    return advantage.detach()


# verl clamps every log-ratio to ±20 before ``exp`` (exp(20) ≈ 4.9e8): the PPO ratio and the rollout
# correction weight (§6) alike.
LOG_RATIO_BOUND = 20.0


def policy_gradient_token_loss(
    student_logp: Tensor,
    advantage: Tensor,
    old_logp: Tensor | None = None,
    clip_ratio: float | None = None,
    clip_ratio_c: float | None = None,
) -> Tensor:
    """§1: REINFORCE ``−A_t ℓ_S(t)``; with ``old_logp`` and ``clip_ratio`` the PPO-clip form
    ``max(−A r, −A clip(r, 1−ε, 1+ε))``, ``r = exp(clamp(ℓ_S − ℓ_old, ±20))``, and with ``clip_ratio_c``
    verl's dual clip: ``min(that, −A c)`` where ``A < 0``."""
    if old_logp is None or clip_ratio is None:
        return -advantage * student_logp
    ratio = torch.exp((student_logp - old_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = torch.maximum(-advantage * ratio, -advantage * clipped)
    if clip_ratio_c is None:
        return loss
    return torch.where(advantage < 0, torch.minimum(loss, -advantage * clip_ratio_c), loss)


def opd_token_loss(
    student_logits: Tensor, labels: Tensor, teacher_logp: Tensor, ref_logp: Tensor | None = None, lam: float = 1.0
) -> Tensor:
    """§1/§2 sampled-token OPD (λ = 1), G-OPD, ExOPD (λ > 1): ``−A_t ℓ_S(t)``."""
    student_logp = token_logprob(student_logits, labels)
    return policy_gradient_token_loss(student_logp, gopd_advantage(student_logp, teacher_logp, ref_logp, lam))


def sft_token_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """§7 SFT / SeqKD: cross-entropy ``−ℓ_S(t)`` on teacher-generated tokens."""
    return -token_logprob(student_logits, labels)


def _plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """``p (log p − log q)`` entrywise with ``0 · (…) = 0`` and gradients free of NaN."""
    live = logp > -math.inf
    safe_p = torch.where(live, logp, torch.zeros_like(logp))
    safe_q = torch.where(live, logq, torch.zeros_like(logq))
    return torch.where(live, safe_p.exp() * (safe_p - safe_q), torch.zeros_like(logp))


def divergence(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """§5 ``D_β(P ‖ Q)`` summed over the last dim; P = teacher, Q = student, given as log-probs.

    β = 0: KL(P‖Q); β = 1: KL(Q‖P); else ``β KL(P‖M) + (1−β) KL(Q‖M)``, ``M = βP + (1−β)Q``.
    """
    if beta == 0.0:
        return _plogp_ratio(teacher_logp, student_logp).sum(-1)
    if beta == 1.0:
        return _plogp_ratio(student_logp, teacher_logp).sum(-1)
    dead = (teacher_logp == -math.inf) & (student_logp == -math.inf)  # M = 0 there; keep its gradient finite
    log_m = torch.logaddexp(
        teacher_logp.masked_fill(dead, 0.0) + math.log(beta), student_logp.masked_fill(dead, 0.0) + math.log(1.0 - beta)
    ).masked_fill(dead, -math.inf)
    return (beta * _plogp_ratio(teacher_logp, log_m) + (1.0 - beta) * _plogp_ratio(student_logp, log_m)).sum(-1)


def restrict(logp: Tensor, ids: Tensor, renormalize: bool, tail_bucket: bool = False) -> Tensor:
    """Full-vocabulary log-probs [N, V] restricted to the support ``ids`` [N, K] (§3-§5).

    ``renormalize``: ``log p̂(v) = log p(v) − log Σ_K p``; else the raw ``log p(v)``, with
    ``tail_bucket`` one extra entry ``log(1 − Σ_K p)``.
    """
    on_support = logp.gather(-1, ids)
    if renormalize:
        return on_support - torch.logsumexp(on_support, dim=-1, keepdim=True)
    if tail_bucket:
        rest = 1.0 - on_support.exp().sum(-1, keepdim=True)
        live = rest > 0
        tail = torch.where(live, torch.where(live, rest, torch.ones_like(rest)).log(), torch.full_like(rest, -math.inf))
        return torch.cat([on_support, tail], dim=-1)
    return on_support


def topk_ids(logits: Tensor, top_k: int) -> Tensor:
    """The ``top_k`` most probable ids per row [N, K] (no gradient)."""
    return logits.detach().topk(top_k, dim=-1).indices


def jsd_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float,
    top_k: int | None = None,
    renormalize: bool = True,
    tail_bucket: bool = False,
) -> Tensor:
    """§5 GKD: ``D_β(p_T ‖ p_S)`` on the full vocabulary (``top_k`` None) or on the teacher top-K."""
    student_logp, teacher_logp = _log_softmax(student_logits), _log_softmax(teacher_logits).detach()
    if top_k is not None:
        ids = topk_ids(teacher_logits, top_k)
        student_logp = restrict(student_logp, ids, renormalize, tail_bucket)
        teacher_logp = restrict(teacher_logp, ids, renormalize, tail_bucket)
    return divergence(student_logp, teacher_logp, beta)


def aopd_intervention(
    student_logp: Tensor,
    teacher_logp: Tensor,
    tau: float,
    variant: str = "default",
    outcome_reward: Tensor | None = None,
    zero_tolerance: float = 1e-3,
) -> Tensor:
    """§3 mask ``m_t`` (bool [N]) from sampled-token log-probs.

    default: ``p_T(y_t) − p_S(y_t) ≤ τ`` (τ = −1: never); zero: ``|A_t| ≤ tolerance``;
    accuracy_filtered: default, only on trajectories whose outcome reward is ≤ 0.
    """
    if variant == "zero":
        return (teacher_logp - student_logp).abs() <= zero_tolerance
    if tau <= -1.0:
        mask = torch.zeros_like(student_logp, dtype=torch.bool)
    else:
        mask = teacher_logp.exp() - student_logp.exp() <= tau
    if variant == "accuracy_filtered":
        if outcome_reward is None:
            raise ValueError("the accuracy-filtered AOPD variant needs the outcome reward of each token's trajectory")
        mask = mask & (outcome_reward <= 0)
    return mask


def aopd_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    top_k: int,
    tau: float,
    beta: float = 0.0,
    *,
    variant: str = "default",
    outcome_reward: Tensor | None = None,
    zero_tolerance: float = 1e-3,
) -> Tensor:
    """§3 AOPD: ``(1 − m_t)(−A_t ℓ_S) + m_t D_β(p̂_T ‖ p̂_S)`` on the teacher top-K, renormalized.

    Gradient flows only into ``student_logits``.
    """
    teacher_logits = teacher_logits.detach()
    student_logp = token_logprob(student_logits, labels)
    teacher_logp = token_logprob(teacher_logits, labels)
    pg = policy_gradient_token_loss(student_logp, gopd_advantage(student_logp, teacher_logp, None, 1.0))
    guide = jsd_token_loss(student_logits, teacher_logits, beta, top_k=top_k, renormalize=True)
    mask = aopd_intervention(student_logp.detach(), teacher_logp, tau, variant, outcome_reward, zero_tolerance)
    return torch.where(mask, guide, pg)


def lsm_support(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, top_k: int, support: str) -> Tensor:
    """§4 support ``K_t`` as ids [N, K] (``teacher_topk+sampled``: [N, K+1], the sampled token
    repeated when it is already in the teacher top-K; :func:`lsm_token_loss` counts it once)."""
    if support == "teacher_topk":
        return topk_ids(teacher_logits, top_k)
    if support == "student_topk":
        return topk_ids(student_logits, top_k)
    if support == "teacher_topk+sampled":
        return torch.cat([topk_ids(teacher_logits, top_k), labels[:, None]], dim=-1)
    raise ValueError(f"unknown LSM support {support!r}")


def lsm_token_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, top_k: int, support: str = "teacher_topk"
) -> Tensor:
    """§4 LSM: ``Σ_{v∈K_t} p̂_S(v)(log p̂_S(v) − log p̂_T(v))``, both renormalized on ``K_t``."""
    ids = lsm_support(student_logits, teacher_logits, labels, top_k, support)
    student_logp, teacher_logp = _log_softmax(student_logits), _log_softmax(teacher_logits.detach())
    if support == "teacher_topk+sampled":
        # The sampled token counts once: drop the extra column where it duplicates a top-K id.
        duplicate = (ids[:, :-1] == labels[:, None]).any(-1)
        on_s, on_t = student_logp.gather(-1, ids), teacher_logp.gather(-1, ids)
        drop = torch.zeros_like(ids, dtype=torch.bool)
        drop[:, -1] = duplicate
        on_s = on_s.masked_fill(drop, -math.inf)
        on_t = on_t.masked_fill(drop, -math.inf)
        on_s = on_s - torch.logsumexp(on_s, -1, keepdim=True)
        on_t = on_t - torch.logsumexp(on_t, -1, keepdim=True)
        return divergence(on_s, on_t, 1.0)
    return divergence(restrict(student_logp, ids, True), restrict(teacher_logp, ids, True), 1.0)
