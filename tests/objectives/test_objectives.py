"""The production objectives (kernels + [N, K] math, TP = 1) equal the independent float64 row formulas:
loss ``Σ_t w_t L_t``, its gradient w.r.t. the student logits and the metrics, for every objective and
option, on random shapes with V not divisible by chunk sizes, -inf logits, fully masked rows, K = 1, K = V."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.registry import build_objective
from tests.objectives import objective_cases as oc
from tests.tolerance import ulps

# id -> (ObjectiveConfig kwargs, build kwargs, case kwargs)
CONFIGS: dict[str, tuple[dict, dict, dict]] = {
    "opd": (dict(name="opd"), {}, {}),
    "opd_no_is": (dict(name="opd", rollout_is="none"), {}, {}),
    "opd_old_given": (dict(name="opd"), {}, dict(give_old=True)),
    "opd_special_mask": (dict(name="opd", special_token_mask=True), {}, {}),
    "opd_temperature": (dict(name="opd"), {}, dict(temperature=0.7)),
    "gopd_half": (dict(name="gopd", lambda_=0.5), {}, {}),
    "exopd": (dict(name="exopd"), {}, {}),
    "exopd_teacher_base": (dict(name="exopd", lambda_=2.0, reference="teacher_base"), {}, {}),
    "exopd_ppo": (dict(name="exopd"), dict(mini_batches_per_step=2), dict(give_old=True)),
    "exopd_adv_old_ppo": (dict(name="exopd", advantage_logp="old", policy_loss="ppo_clip"), {}, dict(give_old=True)),
    "exopd_ppo_dual_clip": (dict(name="exopd"), dict(mini_batches_per_step=2), dict(give_old=True, old_spread=2.0)),
    "opd_ppo_no_dual_clip": (
        dict(name="opd", policy_loss="ppo_clip", clip_ratio_c=None),
        {},
        dict(give_old=True, old_spread=2.0),
    ),
    "aopd_ppo_dual_clip": (dict(name="aopd", top_k=4, policy_loss="ppo_clip"), {}, dict(give_old=True, old_spread=2.0)),
    "opd_rs_token": (dict(name="opd", rollout_rs="token", rollout_rs_threshold=1.5), {}, dict(give_old=True)),
    "opd_rs_sequence": (dict(name="opd", rollout_rs="sequence", rollout_rs_threshold=2.0), {}, dict(give_old=True)),
    "aopd": (dict(name="aopd", top_k=4), {}, {}),
    "aopd_tau_half_beta_half": (dict(name="aopd", top_k=3, tau=0.5, beta=0.5), {}, {}),
    "aopd_tau_neg": (dict(name="aopd", top_k=3, tau=-0.3, beta=1.0), {}, {}),
    "aopd_zero": (dict(name="aopd", top_k=4, aopd_variant="zero", aopd_zero_tolerance=0.5), {}, {}),
    "aopd_accuracy": (dict(name="aopd", top_k=4, tau=0.3, aopd_variant="accuracy_filtered"), {}, {}),
    "aopd_tail_ppo": (
        dict(name="aopd", top_k=4, tau=1.0, renormalize=False, tail_bucket=True),
        dict(mini_batches_per_step=3),
        dict(give_old=True),
    ),
    "aopd_k1": (dict(name="aopd", top_k=1, tau=1.0), {}, {}),
    "lsm_teacher": (dict(name="lsm", top_k=4), {}, {}),
    "lsm_student": (dict(name="lsm", top_k=4, support="student_topk"), {}, {}),
    "lsm_sampled": (dict(name="lsm", top_k=4, support="teacher_topk+sampled"), {}, {}),
    "lsm_k1_sampled": (dict(name="lsm", top_k=1, support="teacher_topk+sampled", special_token_mask=True), {}, {}),
    "gkd_fkl": (dict(name="gkd", top_k=5), {}, {}),
    "gkd_jsd": (dict(name="gkd", top_k=5, beta=0.3), {}, dict(temperature=1.3)),
    "gkd_rkl_raw": (dict(name="gkd", top_k=5, beta=1.0, renormalize=False), {}, {}),
    "gkd_tail": (dict(name="gkd", top_k=5, beta=0.5, renormalize=False, tail_bucket=True), {}, {}),
    "sft": (dict(name="sft"), {}, {}),
    "sft_special_mask": (dict(name="sft", special_token_mask=True), {}, {}),
}
SHAPES = [(1, 7), (6, 37), (10, 130), (5, 1000)]


def _with_masked_ids(cfg: ObjectiveConfig, case: oc.Case) -> ObjectiveConfig:
    """Special-token masking on the case's masked ids."""
    if not cfg.special_token_mask:
        return cfg
    return dataclasses.replace(cfg, masked_token_ids=case.masked_ids)


def _expected(cfg: ObjectiveConfig, case: oc.Case, build: dict) -> tuple[float, torch.Tensor, dict[str, float]]:
    ppo = build.get("mini_batches_per_step", 1) > 1 or cfg.policy_loss == "ppo_clip"
    return oc.expected(_with_masked_ids(cfg, case), case, ppo=ppo)


def _check(got: tuple, want: tuple, scale: float) -> dict[str, float]:
    """Loss, gradient and every expected metric agree (``got`` from the production objective)."""
    loss, grad, metrics = got
    want_loss, want_grad, want_metrics = want
    assert math.isfinite(loss)
    assert abs(loss - want_loss) <= oc.fp32_tol(scale, want_loss), (loss, want_loss)
    torch.testing.assert_close(grad, want_grad, atol=oc.fp32_tol(scale, want_grad.abs().max().item()), rtol=0)
    for name, value in want_metrics.items():
        assert name in metrics, (name, sorted(metrics))
        assert abs(metrics[name] - value) <= oc.fp32_tol(scale, value), (name, metrics[name], value)
    return metrics


def _compare(cfg: ObjectiveConfig, case: oc.Case, build: dict) -> dict[str, float]:
    got = oc.run_objective(_with_masked_ids(cfg, case), case, build)
    return _check(got, _expected(cfg, case, build), oc.logit_scale(case))


@pytest.mark.parametrize(
    "config_id,n,v",
    [(c, n, v) for c in CONFIGS for n, v in SHAPES if CONFIGS[c][0].get("top_k", 0) <= v],
)
def test_objective_matches_plain(config_id: str, n: int, v: int) -> None:
    cfg_kwargs, build, case_kwargs = CONFIGS[config_id]
    cfg = ObjectiveConfig(**cfg_kwargs)
    case = oc.make_case(n, v, seed=hash((config_id, n, v)) % 1000, neg_inf=v > 10, **case_kwargs)
    _compare(cfg, case, build)


@pytest.mark.parametrize("name", ["aopd", "lsm", "gkd", "opd", "sft"])
def test_fully_masked_batch(name: str) -> None:
    cfg = ObjectiveConfig(name=name, top_k=3)
    case = oc.make_case(6, 20, 3, all_masked=True)
    loss, grad, _ = oc.run_objective(cfg, case, {})
    assert loss == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize(
    "name,beta,support",
    [("lsm", None, s) for s in ("teacher_topk", "student_topk", "teacher_topk+sampled")]
    + [("gkd", 0.0, "teacher_topk"), ("gkd", 0.6, "teacher_topk"), ("aopd", 0.0, "teacher_topk")],
)
def test_k_equals_v(name: str, beta: float | None, support: str) -> None:
    """K = V over a vocabulary with -inf (padded) entries."""
    cfg = ObjectiveConfig(name=name, top_k=23, support=support, beta=beta, tau=1.0 if name == "aopd" else 0.0)
    _compare(cfg, oc.make_case(7, 23, 5, neg_inf=True), {})


def test_multi_teacher_metrics_and_overlap() -> None:
    cfg = ObjectiveConfig(name="exopd", top_k=4)
    case = oc.make_case(12, 50, 6)
    metrics = _compare(cfg, case, {})
    for teacher in oc.TEACHERS:
        assert f"opd/advantage/{teacher}" in metrics and f"opd/reward/{teacher}" in metrics
    # reward λ(ℓ_T − ℓ_R) and overlap of teacher top-K with student top-K, written out
    lt = case.teacher_lp.gather(1, case.labels[:, None]).squeeze(1)
    keep = case.response_mask > 0
    reward = float((1.25 * (lt - case.ref_logp))[keep].mean())
    assert abs(metrics["opd/reward"] - reward) <= oc.fp32_tol(oc.logit_scale(case), reward)
    t_ids = [set(oc.plain.topk_list(r, 4)) for r in case.zt]
    s_ids = [set(oc.plain.topk_list(r, 4)) for r in case.zs]
    overlap = [len(t_ids[i] & s_ids[i]) / 4 for i in range(12) if keep[i]]
    assert abs(metrics["support/topk_overlap"] - sum(overlap) / len(overlap)) < 1e-9


def test_aopd_intervention_ratio_limits() -> None:
    case = oc.make_case(10, 40, 7)
    for tau, ratio in ((-1.0, 0.0), (1.0, 1.0)):
        _, _, metrics = oc.run_objective(ObjectiveConfig(name="aopd", top_k=4, tau=tau), case, {})
        assert metrics["aopd/intervention_ratio"] == ratio


def test_requirements() -> None:
    req = build_objective(ObjectiveConfig(name="opd")).requirements
    assert req.teacher_logp and req.reference is None and not req.old_logp and req.rollout_logp and req.support is None
    req = build_objective(ObjectiveConfig(name="exopd", reference="teacher_base"), mini_batches_per_step=2).requirements
    assert req.reference == "teacher_base" and req.old_logp
    req = build_objective(ObjectiveConfig(name="lsm", support="student_topk", top_k=8)).requirements
    assert req.support == "student_topk" and req.top_k == 8 and req.teacher_scores_student_topk
    req = build_objective(ObjectiveConfig(name="lsm", support="teacher_topk+sampled")).requirements
    assert req.support == "teacher_topk" and not req.teacher_scores_student_topk
    req = build_objective(
        ObjectiveConfig(name="aopd", aopd_variant="accuracy_filtered", rollout_rs="token")
    ).requirements
    assert req.outcome_reward and req.old_logp and req.support == "teacher_topk"
    req = build_objective(ObjectiveConfig(name="sft")).requirements
    assert not (req.teacher_logp or req.old_logp or req.rollout_logp or req.support)


def test_missing_inputs_are_named() -> None:
    case = oc.make_case(4, 12, 8)
    with pytest.raises(ValueError, match="ref_logp"):
        objective = build_objective(ObjectiveConfig(name="exopd"))
        from megatron_opd.objectives.inputs import TokenBatch

        objective(
            TokenBatch(
                logits=case.zs.float().requires_grad_(True),
                labels=case.labels,
                response_mask=case.response_mask,
                token_weight=case.weights.float(),
                seq_index=case.seq_index,
                teacher_logp=torch.zeros(4),
                rollout_logp=torch.zeros(4),
            )
        )


@pytest.mark.parametrize("config_id", ["exopd_ppo", "aopd_tau_half_beta_half", "lsm_sampled", "gkd_tail", "sft"])
def test_small_row_chunks(config_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked torch kernels with chunks of a few rows (and a last, shorter one)."""
    from megatron_opd.kernels import torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 3 * 37 + 5)
    cfg_kwargs, build, case_kwargs = CONFIGS[config_id]
    _compare(ObjectiveConfig(**cfg_kwargs), oc.make_case(11, 37, 12, neg_inf=True, **case_kwargs), build)


@pytest.mark.parametrize("config_id", ["opd_temperature", "aopd", "lsm_student", "gkd_jsd"])
def test_bf16_logits(config_id: str) -> None:
    """bf16 logits (the GPU dtype): fp32 math inside, the gradient rounded to bf16."""
    cfg_kwargs, build, case_kwargs = CONFIGS[config_id]
    case = oc.make_case(8, 150, 13, neg_inf=True, **case_kwargs)
    case.zs = case.zs.bfloat16().double()
    case.zt = case.zt.bfloat16().double()
    cfg = ObjectiveConfig(**cfg_kwargs)
    got = oc.run_objective(cfg, case, build, dtype=torch.bfloat16)
    want = _expected(cfg, case, build)
    scale = oc.logit_scale(case)
    assert abs(got[0] - want[0]) <= oc.fp32_tol(scale, want[0])
    g_max = want[1].abs().max().item()  # rounded to bf16 at the end: one bf16 ulp more
    torch.testing.assert_close(got[1], want[1], atol=oc.fp32_tol(scale, g_max) + ulps(torch.bfloat16, g_max, 1), rtol=0)


@pytest.mark.parametrize("config_id", ["exopd_ppo", "aopd_tau_half_beta_half", "lsm_sampled", "gkd_tail"])
def test_triton_kernels_interpreted(config_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same objectives through the Triton kernels (Triton's CPU interpreter)."""
    triton = pytest.importorskip("triton")
    if not triton.knobs.runtime.interpret:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set")
    monkeypatch.setenv("OPD_KERNELS", "triton")
    cfg_kwargs, build, case_kwargs = CONFIGS[config_id]
    _compare(ObjectiveConfig(**cfg_kwargs), oc.make_case(6, 300, 14, neg_inf=True, **case_kwargs), build)


def test_dual_clip_caps_negative_advantages() -> None:
    """Tokens with ratio r > clip_ratio_c and A < 0 lose ``−A·c`` (verl's dual clip), not ``−A·r``; others
    are unchanged; ``ppo/clip_frac_lower`` counts the capped ones."""
    case = oc.make_case(40, 60, 31, give_old=True, old_spread=2.0)
    lt = case.teacher_lp.gather(1, case.labels[:, None]).squeeze(1)
    ls = torch.stack([oc.plain.log_softmax_row(r) for r in case.zs]).gather(1, case.labels[:, None]).squeeze(1)
    adv, ratio = lt - ls, torch.exp(ls - case.old_logp)
    capped = (case.response_mask > 0) & (adv < 0) & (ratio > 3.0)
    assert int(capped.sum()) >= 3  # the case exercises the cap
    on = ObjectiveConfig(name="opd", policy_loss="ppo_clip")
    off = dataclasses.replace(on, clip_ratio_c=None)
    got_on, got_off = oc.run_objective(on, case, {}), oc.run_objective(off, case, {})
    _check(got_on, _expected(on, case, {}), oc.logit_scale(case))
    _check(got_off, _expected(off, case, {}), oc.logit_scale(case))
    assert got_on[0] < got_off[0] - 1e-3  # capping −A·r at −A·3 lowers the loss
    keep = case.response_mask > 0
    assert abs(got_on[2]["ppo/clip_frac_lower"] - float(capped[keep].double().mean())) < 1e-9
    assert "ppo/clip_frac_lower" not in got_off[2]


def test_log_ratios_clamped_to_twenty() -> None:
    """The PPO ratio and the rollout-correction weight use ``exp(clamp(log-ratio, ±20))`` (verl)."""
    from megatron_opd.objectives.reference import policy_gradient_token_loss
    from megatron_opd.objectives.rollout_correction import token_is_weights

    log_ratio = torch.tensor([-30.0, -20.5, -3.0, 0.0, 1.0, 25.0], dtype=torch.float64)
    want = torch.tensor([oc.plain.rollout_weight(float(x), 5.0) for x in log_ratio], dtype=torch.float64)
    torch.testing.assert_close(token_is_weights(log_ratio, torch.zeros_like(log_ratio), 5.0), want, rtol=1e-12, atol=0)
    assert float(want[0]) == math.exp(-20.0)
    ls = torch.tensor([0.0, 0.0], dtype=torch.float64)
    old = torch.tensor([-25.0, 25.0], dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    loss = policy_gradient_token_loss(ls, adv, old, 0.2, None)
    torch.testing.assert_close(
        loss, torch.tensor([math.exp(20.0), -math.exp(-20.0)], dtype=torch.float64), rtol=1e-12, atol=0
    )
