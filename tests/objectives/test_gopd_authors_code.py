"""G-OPD/ExOPD against the authors' loss as their scripts run it (RUCBM/G-OPD @37371a4, read from
``dp_actor.update_policy``, ``core_algos.compute_policy_loss_vanilla`` / ``agg_loss`` and
``rollout_corr_helper.compute_rollout_correction_weights``; re-written here in float64, not imported):
micro-batches of one sequence, on-policy ``old_log_prob = log_prob.detach()``, advantage
``−(old − base − λ(ref − base))`` (λ = 1: ``−(old − ref)``), dual-clip PPO loss, token-level IS weights
``min(exp(clamp(old − rollout, ±20)), 5)``, token-mean per micro-batch scaled by 1/gradient-accumulation.
The production objective (fp32 logits) with ``loss_agg_mode: seq-mean-token-mean`` has the same gradient on
responses of unequal length (the loss values differ by construction: REINFORCE's surrogate is ``−A ℓ_S``, the
on-policy PPO one ``−A r`` with ``r = 1``); ``token-mean`` does not."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_opd.objectives import aggregation as agg
from megatron_opd.objectives.config import ObjectiveConfig
from tests.objectives import objective_cases as oc

LENGTHS = [7, 2, 5, 1, 9, 3]  # response lengths of the six sequences


def authors_grad(case: oc.Case, teacher_lp: torch.Tensor, lam: float) -> torch.Tensor:
    """The gradient w.r.t. the student logits of the sum over sequences of their micro-batch losses."""
    zs = case.zs.clone().requires_grad_(True)
    log_prob_all = torch.log_softmax(zs, -1).gather(1, case.labels[:, None]).squeeze(1)
    ref = teacher_lp.gather(1, case.labels[:, None]).squeeze(1)  # their "ref" is the teacher
    base = case.ref_logp  # their "base" is the reference model
    grad_accumulation = len(LENGTHS)
    total = torch.zeros((), dtype=torch.float64)
    for seq in range(len(LENGTHS)):
        rows = case.seq_index == seq
        log_prob, mask = log_prob_all[rows], case.response_mask[rows].double()
        old_log_prob = log_prob.detach()  # on-policy
        if lam == 1.0:
            reverse_kl = old_log_prob - ref[rows]
        else:
            reverse_kl = old_log_prob - base[rows] - (ref[rows] - base[rows]) * lam
        advantages = -reverse_kl
        ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0))
        pg_losses1 = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 0.8, 1.2)
        clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
        clip_pg_losses2 = torch.min(-advantages * 3.0, clip_pg_losses1)
        pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
        # rollout_is_weights: from the recomputed old_log_probs (= ℓ_S on-policy) and the rollout's log-probs
        log_ratio = torch.where(mask > 0, old_log_prob - case.rollout_logp[rows], torch.zeros_like(old_log_prob))
        weights = (torch.exp(torch.clamp(log_ratio, -20.0, 20.0)) * mask).clamp(max=5.0)
        pg_losses = pg_losses * weights
        token_mean = (pg_losses * mask).sum() / (mask.sum() + 1e-8)
        total = total + token_mean / grad_accumulation
    total.backward()
    return zs.grad


def _case(seed: int) -> oc.Case:
    case = oc.make_case(sum(LENGTHS), 40, seed, masked_rows=0, rollout_spread=1.5)
    seq_index = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    case.response_mask[[3, 15]] = 0  # a masked token inside two sequences
    case.rollout_logp[case.response_mask == 0] = math.nan
    return dataclasses.replace(case, seq_index=seq_index)


def _ours(case: oc.Case, cfg: ObjectiveConfig) -> torch.Tensor:
    """The production objective's gradient w.r.t. the student logits, weighted by ``cfg.loss_agg_mode``."""
    counts = agg.global_counts([agg.local_counts(case.response_mask, case.seq_index)])
    weights = agg.token_weights(case.response_mask, case.seq_index, counts, cfg.loss_agg_mode, torch.float64)
    return oc.run_objective(cfg, dataclasses.replace(case, weights=weights), {})[1]


@pytest.mark.parametrize("name,lam", [("opd", 1.0), ("gopd", 0.5), ("exopd", 1.25)])
def test_seq_mean_token_mean_is_the_authors_loss(name: str, lam: float) -> None:
    case = _case(seed=41)
    cfg = ObjectiveConfig(name=name, lambda_=None if name == "opd" else lam, loss_agg_mode="seq-mean-token-mean")
    want_grad = authors_grad(case, case.teacher_lp, lam)
    # the production objective in fp32 against the authors' formula in float64: at the logits' scale
    tol = oc.fp32_tol(oc.logit_scale(case), want_grad.abs().max().item())
    torch.testing.assert_close(_ours(case, cfg), want_grad, rtol=0, atol=tol)
    # token-mean weighs long responses more: a different gradient
    token_mean_grad = _ours(case, dataclasses.replace(cfg, loss_agg_mode="token-mean"))
    assert (token_mean_grad - want_grad).abs().max() > 0.1 * want_grad.abs().max()


def test_two_teacher_routing_is_the_authors_loss() -> None:
    """multi_teacher_distill: each sequence's advantage uses its own teacher (math / code), one reference."""
    case = _case(seed=42)
    g = torch.Generator().manual_seed(7)
    code_logits = torch.randn(case.zt.shape, generator=g, dtype=torch.float64) * 2
    math_lp, code_lp = case.teacher_lp, torch.log_softmax(code_logits, -1)
    route = torch.tensor([0, 1, 1, 0, 1, 0])[case.seq_index]  # 0 math, 1 code
    routed = torch.where(route[:, None] == 0, math_lp, code_lp)
    want_grad = authors_grad(case, routed, 1.25)
    # ours gets each sample's own teacher's scores from scoring: the routed rows, as logits
    ours_case = dataclasses.replace(case, zt=routed, teacher_index=route)
    grad = _ours(ours_case, ObjectiveConfig(name="exopd", loss_agg_mode="seq-mean-token-mean"))
    tol = oc.fp32_tol(oc.logit_scale(ours_case), want_grad.abs().max().item())  # as above, the routed logits'
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=tol)
