"""support_divergence against a float64 probability-space reference: values, gradients, -inf safety."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.kernels import support_divergence
from megatron_opd.kernels.divergence import support_divergence_reference
from tests.tolerance import ulps

MODES = {"renorm": (True, False), "tail": (False, True), "raw": (False, False)}
# fp32 divergences against float64 from the same log-probs: exponentials, sums of K terms, logs and products, each
# rounding at the scale of the largest |log-prob|; a divergence's gradient scales that by its own size.
ULPS = 32


def scale(*logps: torch.Tensor) -> float:
    """max |log p| over the finite entries."""
    return max(t[torch.isfinite(t)].abs().max().item() for t in logps)


def _support(seed: int, n: int = 6, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of K entries of two full-vocab distributions (so Σ_K p < 1), and a mask with one dead row."""
    g = torch.Generator().manual_seed(seed)
    full_q = torch.log_softmax(torch.randn(n, 3 * k, generator=g, dtype=torch.float64) * 2, -1)
    full_p = torch.log_softmax(torch.randn(n, 3 * k, generator=g, dtype=torch.float64) * 2, -1)
    valid = torch.rand(n, k, generator=g) > 0.25
    valid[:, 0] = True
    return full_q[:, :k].float(), full_p[:, :k].float(), valid


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_grad_match_float64(beta: float, mode: str, masked: bool) -> None:
    renorm, tail = MODES[mode]
    q, p, valid = _support(int(beta * 10) + len(mode))
    valid = valid if masked else None
    kw = dict(renormalize=renorm, tail_bucket=tail, valid=valid)
    qs = q.clone().requires_grad_(True)
    d = support_divergence(qs, p, beta, **kw)
    qr = q.double().requires_grad_(True)
    dr = support_divergence_reference(qr, p.double(), beta, **kw)
    assert d.shape == (q.shape[0],) and d.dtype == torch.float32
    m = scale(q, p)
    torch.testing.assert_close(d.double(), dr, atol=ulps(torch.float32, m, ULPS), rtol=0)
    w = torch.randn(q.shape[0], dtype=torch.float64)
    (d.double() * w).sum().backward()
    (dr * w).sum().backward()
    g_max = qr.grad.abs().max().item()
    torch.testing.assert_close(qs.grad.double(), qr.grad, atol=ulps(torch.float32, g_max * m, ULPS), rtol=0)
    if mode != "raw":  # a divergence between (sub-)distributions completed to total mass 1
        assert (d >= -ulps(torch.float32, m, ULPS)).all()


def test_identical_distributions_give_zero() -> None:
    q, _, _ = _support(3)
    for beta in (0.0, 0.5, 1.0):
        for renorm, tail in MODES.values():
            d = support_divergence(q, q.clone(), beta, renormalize=renorm, tail_bucket=tail)
            torch.testing.assert_close(d, torch.zeros_like(d), atol=ulps(torch.float32, scale(q), ULPS), rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", list(MODES))
def test_neg_inf_entries_are_safe(beta: float, mode: str) -> None:
    """-inf in either side, entries dead on both sides, and a fully masked row: finite values, no NaN gradient."""
    renorm, tail = MODES[mode]
    q, p, valid = _support(5)
    q[0, 1] = -math.inf
    p[0, 2] = -math.inf
    q[1, 3] = p[1, 3] = -math.inf
    valid[2] = False
    qs = q.clone().requires_grad_(True)
    d = support_divergence(qs, p, beta, renormalize=renorm, tail_bucket=tail, valid=valid)
    ref = support_divergence_reference(q.double(), p.double(), beta, renormalize=renorm, tail_bucket=tail, valid=valid)
    assert d[2] == 0
    finite = torch.isfinite(ref)
    torch.testing.assert_close(d.double()[finite], ref[finite], atol=ulps(torch.float32, scale(q, p), ULPS), rtol=0)
    # KL with zero mass where the other side has some is +inf; here it is huge but finite (LOG_FLOOR).
    assert torch.isfinite(d).all() and (d[torch.isinf(ref)] > 10).all()
    d.sum().backward()
    assert torch.isfinite(qs.grad).all()
    assert (qs.grad[2] == 0).all() and qs.grad[1, 3] == 0


def test_bad_arguments_name_themselves() -> None:
    q = torch.zeros(2, 3)
    cases = [
        (dict(student_logp=torch.zeros(2, 4)), ValueError, "student_logp/teacher_logp"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(renormalize=True, tail_bucket=True), ValueError, "tail_bucket"),
        (dict(valid=torch.ones(2, 3)), TypeError, "valid"),
        (dict(valid=torch.ones(2, 2, dtype=torch.bool)), ValueError, "valid"),
    ]
    for kwargs, error, key in cases:
        args = dict(student_logp=q, teacher_logp=q, beta=0.0, renormalize=True, tail_bucket=False, valid=None) | kwargs
        with pytest.raises(error, match=rf"^{key}"):
            support_divergence(
                args["student_logp"],
                args["teacher_logp"],
                args["beta"],
                renormalize=args["renormalize"],
                tail_bucket=args["tail_bucket"],
                valid=args["valid"],
            )
