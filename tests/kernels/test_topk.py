"""topk_logprobs (single process) against float64 log_softmax + topk, both backends."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.kernels import topk_logprobs
from megatron_opd.kernels.topk import topk_logprobs_reference
from megatron_opd.selftest.tolerance import logit_scale, logprob_atol
from tests.kernels.kernel_cases import make_case

# (n, v, k, dtype, temperature)
CASES = {
    "fp32_k3": (5, 61, 3, torch.float32, 1.0),
    "bf16_k4_temp": (4, 70, 4, torch.bfloat16, 0.6),
    "k1": (3, 37, 1, torch.float32, 1.0),
    "k_equals_v": (3, 17, 17, torch.float32, 1.0),
    "k8_wide": (3, 200, 8, torch.float32, 1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_topk_matches_float64(backend: str, case: str) -> None:
    n, v, k, dtype, temperature = CASES[case]
    logits, _, _ = make_case(hash(case) % 1000, n, v, None, dtype=dtype)
    ids, logp = topk_logprobs(logits, k, temperature=temperature)
    _ref_ids, ref_logp = topk_logprobs_reference(logits, k, temperature=temperature)
    assert ids.dtype == torch.int64 and logp.dtype == torch.float32 and ids.shape == (n, k)
    atol = logprob_atol(logit_scale(logits, temperature))
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=0)
    # Ties (bf16 logits have some) may order equal values differently: compare the value at each chosen id instead.
    full = torch.log_softmax(logits.double() / temperature, -1)
    torch.testing.assert_close(full.gather(1, ids), ref_logp, atol=atol, rtol=0)
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # distinct ids
    assert (logp.diff(dim=1) <= 0).all()  # descending


def test_topk_with_neg_inf_rows(backend: str) -> None:
    logits, _, _ = make_case(21, 4, 40, None, neg_inf=True)
    logits[1, :-3] = -torch.inf  # only 3 finite entries, k = 5
    ids, logp = topk_logprobs(logits, 5)
    _ref_ids, ref_logp = topk_logprobs_reference(logits, 5)
    assert torch.equal(torch.isinf(logp), torch.isinf(ref_logp))
    fin = torch.isfinite(ref_logp)
    torch.testing.assert_close(logp.double()[fin], ref_logp[fin], atol=logprob_atol(logit_scale(logits, 1.0)), rtol=0)
    assert ((ids >= 0) & (ids < 40)).all()


def test_topk_no_grad_and_bad_k() -> None:
    logits = torch.randn(2, 10, requires_grad=True)
    _ids, logp = topk_logprobs(logits, 2)
    assert not logp.requires_grad
    for bad in (0, 11, 2.0):
        with pytest.raises(ValueError, match=r"^k="):
            topk_logprobs(logits, bad)


def test_triton_ties_go_to_the_lower_id(monkeypatch) -> None:
    """Equal logits (bf16 has many; -0.0 equals +0.0) are taken lowest id first, as documented for the kernels."""
    monkeypatch.setenv("OPD_KERNELS", "triton")
    monkeypatch.setenv("OPD_TRITON_BLOCK_V", "16")
    logits = torch.zeros(3, 70, dtype=torch.bfloat16)
    logits[1, 40:] = 1.0
    logits[2, :5] = -0.0  # then +0.0 at columns 5..9: all ten tie
    logits[2, 10:] = -1.0
    ids, logp = topk_logprobs(logits, 6)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5], [40, 41, 42, 43, 44, 45], [0, 1, 2, 3, 4, 5]]
    assert (logp[0] == logp[0, 0]).all()
