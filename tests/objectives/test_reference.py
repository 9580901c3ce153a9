"""``objectives/reference.py`` equals the independent row-by-row float64 formulas of ``plain.py``,
values and gradients w.r.t. the student logits, and the limits of docs/objectives.md hold."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.objectives import reference as ref
from tests.objectives import objective_plain as plain
from tests.tolerance import ulps

SHAPES = [(1, 5), (7, 37), (5, 130), (9, 64)]


def make_case(n: int, v: int, seed: int, neg_inf: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student/teacher logits [N, V] (float64) and labels; ``neg_inf``: the last two vocabulary
    entries are -inf for both models (a padded vocabulary), and the labels avoid them."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + 0.5 * zs
    finite = v - 2 if neg_inf and v > 3 else v
    if finite < v:
        zs[:, finite:] = -math.inf
        zt[:, finite:] = -math.inf
    labels = torch.randint(0, finite, (n,), generator=g)
    return zs, zt, labels


def check(fn_ref, fn_row, zs: torch.Tensor) -> None:
    """Compare values and gradients (of a random weighting of the rows) of ``fn_ref(zs)`` [N]
    against ``fn_row(zs[i], i)`` for every row. Both are float64, in other orders (batched vs one row, up to V
    terms per sum): 4096 float64 ulps of the logits' scale × max(1, |value|)."""
    finite = zs[torch.isfinite(zs)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    weights = torch.rand(zs.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    a = zs.clone().requires_grad_(True)
    got = fn_ref(a)
    (got * weights).sum().backward()
    b = zs.clone().requires_grad_(True)
    want = torch.stack([fn_row(b[i], i) for i in range(zs.shape[0])])
    (want * weights).sum().backward()
    for x, y in ((got.detach(), want.detach()), (a.grad, b.grad)):
        atol = ulps(torch.float64, scale * max(1.0, y[torch.isfinite(y)].abs().max().item()), 4096)
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("neg_inf", [False, True])
def test_token_logprob_entropy_sft(n: int, v: int, neg_inf: bool) -> None:
    zs, _, y = make_case(n, v, 0, neg_inf)
    check(lambda a: ref.token_logprob(a, y), lambda r, i: plain.log_softmax_row(r)[y[i]], zs)
    check(lambda a: ref.sft_token_loss(a, y), lambda r, i: -plain.log_softmax_row(r)[y[i]], zs)
    check(ref.token_entropy, lambda r, i: plain.entropy_row(r), zs)


@pytest.mark.parametrize("lam", [1.0, 0.5, 1.25, 2.0])
def test_opd_gopd_exopd(lam: float) -> None:
    zs, zt, y = make_case(6, 23, 1)
    lt = torch.log_softmax(zt, -1).gather(-1, y[:, None]).squeeze(-1)
    lr = torch.randn(6, dtype=torch.float64) - 3.0

    def row(r: torch.Tensor, i: int) -> torch.Tensor:
        ls = plain.log_softmax_row(r)[y[i]]
        reward = lam * (float(lt[i]) - float(lr[i]))
        adv = reward - (float(ls) - float(lr[i]))  # §2: λ(ℓ_T − ℓ_R) − (ℓ_S − ℓ_R)
        return -adv * ls

    check(lambda a: ref.opd_token_loss(a, y, lt, lr, lam), row, zs)


def test_lambda_one_ignores_reference() -> None:
    ls, lt = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    nan_ref = torch.full((8,), math.nan, dtype=torch.float64)
    torch.testing.assert_close(ref.gopd_advantage(ls, lt, nan_ref, 1.0), lt - ls)
    torch.testing.assert_close(ref.gopd_advantage(ls, lt, None, 1.0), lt - ls)
    with pytest.raises(ValueError, match="reference"):
        ref.gopd_advantage(ls, lt, None, 1.25)


def test_ppo_clip_form() -> None:
    ls = torch.randn(32, dtype=torch.float64, requires_grad=True)
    old = (ls.detach() + torch.randn(32, dtype=torch.float64) * 0.5).tolist()
    adv = torch.randn(32, dtype=torch.float64)
    got = ref.policy_gradient_token_loss(ls, adv, torch.tensor(old, dtype=torch.float64), 0.2)
    want = torch.stack([plain.pg_loss(ls[i], float(adv[i]), old[i], 0.2) for i in range(32)])
    torch.testing.assert_close(got, want)
    # On-policy (ℓ_old = ℓ_S) the PPO-clip gradient equals the REINFORCE gradient.
    on = ref.policy_gradient_token_loss(ls, adv, ls.detach(), 0.2).sum()
    (g_ppo,) = torch.autograd.grad(on, ls)
    (g_pg,) = torch.autograd.grad(ref.policy_gradient_token_loss(ls, adv).sum(), ls)
    torch.testing.assert_close(g_ppo, g_pg)


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd(n: int, v: int, beta: float) -> None:
    zs, zt, _ = make_case(n, v, 2, neg_inf=True)
    for top_k, renorm, tail in [(None, True, False), (1, True, False), (4, True, False), (4, False, False)]:
        k = None if top_k is None else min(top_k, v)
        check(
            lambda a, k=k, renorm=renorm: ref.jsd_token_loss(a, zt, beta, top_k=k, renormalize=renorm),
            lambda r, i, k=k, renorm=renorm, tail=tail: plain.gjsd_row(r, zt[i], beta, k, renorm, tail),
            zs,
        )
    k = min(5, v - 2) if v > 3 else 1
    check(
        lambda a: ref.jsd_token_loss(a, zt, beta, top_k=k, renormalize=False, tail_bucket=True),
        lambda r, i: plain.gjsd_row(r, zt[i], beta, k, False, True),
        zs,
    )


def test_jsd_k_equals_v() -> None:
    """K = V with a padded (-inf) vocabulary: the top-K divergence is the full one."""
    zs, zt, _ = make_case(6, 19, 3, neg_inf=True)
    for beta in (0.0, 0.4, 1.0):
        full = ref.jsd_token_loss(zs, zt, beta)
        torch.testing.assert_close(ref.jsd_token_loss(zs, zt, beta, top_k=19), full)
        check(
            lambda a, beta=beta: ref.jsd_token_loss(a, zt, beta, top_k=19),
            lambda r, i, beta=beta: plain.gjsd_row(r, zt[i], beta, None, True, False),
            zs,
        )


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("tau", [-1.0, -0.2, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_aopd(n: int, v: int, tau: float, beta: float) -> None:
    zs, zt, y = make_case(n, v, 4)
    k = min(3, v)
    check(
        lambda a: ref.aopd_token_loss(a, zt, y, k, tau, beta),
        lambda r, i: plain.aopd_row(r, zt[i], int(y[i]), k, tau, beta)[0],
        zs,
    )


def test_aopd_variants() -> None:
    zs, zt, y = make_case(10, 16, 5)
    zt[:4] = zs[:4] + 1e-5  # near-zero advantage rows for AOPD-Zero
    reward = torch.tensor([0.0, 1.0] * 5, dtype=torch.float64)
    check(
        lambda a: ref.aopd_token_loss(a, zt, y, 4, 0.0, variant="zero", zero_tolerance=1e-3),
        lambda r, i: plain.aopd_row(r, zt[i], int(y[i]), 4, 0.0, 0.0, variant="zero", tol=1e-3)[0],
        zs,
    )
    check(
        lambda a: ref.aopd_token_loss(a, zt, y, 4, 0.2, variant="accuracy_filtered", outcome_reward=reward),
        lambda r, i: plain.aopd_row(
            r, zt[i], int(y[i]), 4, 0.2, 0.0, variant="accuracy_filtered", reward=float(reward[i])
        )[0],
        zs,
    )


def test_aopd_gradient_only_into_student() -> None:
    zs, zt, y = make_case(5, 12, 6)
    zt = zt.clone().requires_grad_(True)
    ref.aopd_token_loss(zs.requires_grad_(True), zt, y, 3, 0.0).sum().backward()
    assert zt.grad is None and zs.grad is not None


def test_aopd_forward_kl_gradient_is_distribution_gap() -> None:
    """AOPD paper Eq. 14: on the support the forward-KL logit gradient is p̂_S − p̂_T, 0 outside."""
    zs, zt, y = make_case(4, 15, 7)
    a = zs.clone().requires_grad_(True)
    ref.aopd_token_loss(a, zt, y, 5, tau=1.0).sum().backward()
    for i in range(4):
        ids = plain.topk_list(zt[i], 5)
        ps = torch.softmax(zs[i, ids], -1)
        pt = torch.softmax(zt[i, ids], -1)
        want = torch.zeros(15, dtype=torch.float64)
        want[ids] = ps - pt
        torch.testing.assert_close(a.grad[i], want)


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("support", ["teacher_topk", "student_topk", "teacher_topk+sampled"])
@pytest.mark.parametrize("top_k", [1, 4])
def test_lsm(n: int, v: int, support: str, top_k: int) -> None:
    zs, zt, y = make_case(n, v, 8)
    k = min(top_k, v)
    y[0] = int(zt[0].argmax())  # one sampled token already in the teacher top-K (dedupe)
    check(
        lambda a: ref.lsm_token_loss(a, zt, y, k, support),
        lambda r, i: plain.lsm_row(r, zt[i], int(y[i]), k, support),
        zs,
    )


# ---- limits of docs/objectives.md ----


def test_limit_tau_minus_one_is_opd() -> None:
    zs, zt, y = make_case(12, 40, 9)
    lt = torch.log_softmax(zt, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(ref.aopd_token_loss(zs, zt, y, 8, -1.0), ref.opd_token_loss(zs, y, lt))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_limit_tau_one_is_topk_gkd(beta: float) -> None:
    zs, zt, y = make_case(12, 40, 10)
    torch.testing.assert_close(
        ref.aopd_token_loss(zs, zt, y, 8, 1.0, beta), ref.jsd_token_loss(zs, zt, beta, top_k=8, renormalize=True)
    )


def test_limit_lsm_full_support_is_reverse_kl() -> None:
    zs, zt, y = make_case(8, 33, 11, neg_inf=True)
    full = ref.jsd_token_loss(zs, zt, 1.0)
    for support in ("teacher_topk", "student_topk", "teacher_topk+sampled"):
        torch.testing.assert_close(ref.lsm_token_loss(zs, zt, y, 33, support), full)
    # and that is Σ_v p_S (log p_S − log p_T) written out
    ps, pt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    live = ps > -math.inf
    want = torch.where(live, ps.exp() * (ps - pt), torch.zeros_like(ps)).sum(-1)
    torch.testing.assert_close(full, want)
