"""The limits of docs/objectives.md hold for the production objectives: λ = 1 ignores the reference,
τ = −1 is sampled-token OPD, τ = 1 is top-K GKD, LSM with K = V is the full reverse KL."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_opd.objectives import reference as ref
from megatron_opd.objectives.config import ObjectiveConfig
from tests.objectives import objective_cases as oc


def _close(a: tuple, b: tuple, case: oc.Case) -> None:
    """Two objectives that agree in the limit, each in fp32 through its own branch."""
    scale = oc.logit_scale(case)
    assert abs(a[0] - b[0]) <= oc.fp32_tol(scale, b[0]), (a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=oc.fp32_tol(scale, b[1].abs().max().item()), rtol=0)


def test_lambda_one_ignores_reference() -> None:
    case = oc.make_case(10, 60, 21)
    with_ref = oc.run_objective(ObjectiveConfig(name="gopd", lambda_=1.0), case, {})
    nan_ref = dataclasses.replace(case, ref_logp=torch.full_like(case.ref_logp, math.nan))
    _close(oc.run_objective(ObjectiveConfig(name="opd"), nan_ref, {}), with_ref, case)
    _close(oc.run_objective(ObjectiveConfig(name="gopd", lambda_=1.0), nan_ref, {}), with_ref, case)
    # and λ ≠ 1 does read it
    other = oc.run_objective(ObjectiveConfig(name="gopd", lambda_=1.5), case, {})
    assert abs(other[0] - with_ref[0]) > 1e-4


@pytest.mark.parametrize("policy_loss", ["reinforce", "ppo_clip"])
def test_tau_minus_one_is_opd(policy_loss: str) -> None:
    case = oc.make_case(12, 80, 22, give_old=True)
    aopd = oc.run_objective(ObjectiveConfig(name="aopd", tau=-1.0, top_k=8, policy_loss=policy_loss), case, {})
    opd = oc.run_objective(ObjectiveConfig(name="opd", policy_loss=policy_loss), case, {})
    _close(aopd, opd, case)
    assert aopd[2]["aopd/intervention_ratio"] == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_tau_one_is_topk_gkd(beta: float) -> None:
    case = oc.make_case(12, 80, 23)
    aopd = oc.run_objective(ObjectiveConfig(name="aopd", tau=1.0, top_k=8, beta=beta), case, {})
    gkd = oc.run_objective(ObjectiveConfig(name="gkd", top_k=8, beta=beta), case, {})
    _close(aopd, gkd, case)
    assert aopd[2]["aopd/intervention_ratio"] == 1.0


@pytest.mark.parametrize("support", ["teacher_topk", "student_topk", "teacher_topk+sampled"])
def test_lsm_full_support_is_reverse_kl(support: str) -> None:
    case = oc.make_case(9, 41, 24, neg_inf=True)
    got = oc.run_objective(ObjectiveConfig(name="lsm", top_k=41, support=support), case, {})
    # the full-vocabulary reverse KL Σ_v p_S (log p_S − log p_T), weighted and masked like the objective
    zs = case.zs.clone().requires_grad_(True)
    rkl = ref.jsd_token_loss(zs, case.zt, 1.0)
    keep = case.response_mask > 0
    total = (torch.where(keep, rkl, torch.zeros_like(rkl)) * case.weights).sum()
    total.backward()
    _close(got, (float(total.detach()), zs.grad), case)
