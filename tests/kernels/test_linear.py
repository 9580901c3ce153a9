"""linear_token_logprobs (fused LM head, chunked over tokens) against float64 log_softmax(h Wᵀ): values and the
gradients w.r.t. hidden states and weight, both backends."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.bench.common import LiveTensorBytes
from megatron_opd.kernels import linear_token_logprobs, linear_topk_logprobs, token_logprobs
from megatron_opd.kernels.linear_topk import linear_topk_logprobs_reference
from megatron_opd.selftest.tolerance import linear_logit_scale, logprob_atol
from tests.kernels.kernel_cases import (
    assert_close_grad,
    assert_close_outputs,
    linear_ours_with_grad,
    linear_reference_with_grad,
    make_linear_case,
)

# (n, hidden, v, k, dtype, temperature, chunk_tokens, chunk_columns): ragged last chunks (rows forward, columns
# backward), one chunk, no ids
CASES = {
    "fp32_chunks": (7, 12, 37, 4, torch.float32, 1.0, 3, 10),
    "fp32_one_chunk_temp": (5, 8, 29, 3, torch.float32, 0.7, None, None),
    "bf16_chunks": (6, 16, 45, 5, torch.bfloat16, 1.0, 4, 16),
    "fp32_no_ids": (4, 8, 33, None, torch.float32, 1.2, 1, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(backend: str, case: str) -> None:
    n, h, v, k, dtype, temperature, chunk, columns = CASES[case]
    hidden, weight, labels, ids = make_linear_case(len(case), n, h, v, k, dtype)
    out, d_h, d_w = linear_ours_with_grad(
        hidden, weight, labels, ids, temperature, chunk_tokens=chunk, chunk_columns=columns
    )
    ref, ref_dh, ref_dw = linear_reference_with_grad(hidden, weight, labels, ids, temperature)
    scale = linear_logit_scale(hidden, weight, temperature)
    assert_close_outputs(out, ref, atol=logprob_atol(scale, dtype))
    assert_close_grad(d_h, ref_dh, dtype, scale)
    assert_close_grad(d_w, ref_dw, dtype, scale)


def test_equals_token_logprobs_on_materialized_logits(backend: str) -> None:
    hidden, weight, labels, ids = make_linear_case(3, 6, 8, 31, 3, torch.float32)
    fused = linear_token_logprobs(hidden, weight, labels, ids, chunk_tokens=4)
    plain = token_logprobs(hidden @ weight.t(), labels, ids)
    atol = logprob_atol(linear_logit_scale(hidden, weight, 1.0))  # chunked vs one matmul: reordered rounding
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_frozen_weight_gets_no_gradient_work() -> None:
    hidden, weight, labels, _ = make_linear_case(4, 4, 8, 20, None, torch.float32)
    h = hidden.clone().requires_grad_(True)
    linear_token_logprobs(h, weight, labels).entropy.sum().backward()
    assert h.grad is not None and weight.grad is None


def test_bad_shapes_and_chunk() -> None:
    labels = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^hidden/weight"):
        linear_token_logprobs(torch.zeros(3, 4), torch.zeros(10, 5), labels)
    with pytest.raises(TypeError, match=r"^hidden/weight"):
        linear_token_logprobs(torch.zeros(3, 4), torch.zeros(10, 4, dtype=torch.bfloat16), labels)
    with pytest.raises(ValueError, match=r"^chunk_tokens=0"):
        linear_token_logprobs(torch.zeros(3, 4), torch.zeros(10, 4), labels, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"^chunk_columns=0"):
        linear_token_logprobs(torch.zeros(3, 4), torch.zeros(10, 4), labels, chunk_columns=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_scoring_matches_float64(backend: str, dtype: torch.dtype) -> None:
    """Top-k ids and log-probs, label log-prob, entropy and ids log-probs of ``h Wᵀ`` in one pass per chunk."""
    hidden, weight, labels, ids = make_linear_case(5, 7, 8, 61, 3, dtype)
    out = linear_topk_logprobs(hidden, weight, labels, 5, ids, temperature=0.8, chunk_tokens=3)
    ref = linear_topk_logprobs_reference(hidden, weight, labels, 5, ids, temperature=0.8)
    assert out.ids.dtype == torch.int64 and out.ids.shape == (7, 5) and not out.logprobs.requires_grad
    full = torch.log_softmax((hidden @ weight.t()).double() / 0.8, -1)
    atol = logprob_atol(linear_logit_scale(hidden, weight, 0.8), dtype)
    torch.testing.assert_close(full.gather(1, out.ids), ref.logprobs, atol=atol, rtol=0)  # ties: any of the ids
    for got, want in zip(out[1:], ref[1:]):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    assert (out.logprobs.diff(dim=1) <= 0).all() and out.label_logprob[1] == 0  # descending; ignored label


def test_no_vocab_sized_tensor_beyond_a_chunk(monkeypatch) -> None:
    """Forward (rows) and backward (columns) of the fused LM head, and its top-k scoring, hold a few chunks of logits
    at a time: far below one fp32 [N, V] tensor (which the materializing way keeps several of)."""
    monkeypatch.setenv("OPD_KERNELS", "torch")
    n, h, v = 256, 8, 2000
    hidden, weight, labels, ids = make_linear_case(6, n, h, v, 4, torch.float32)
    full_fp32 = n * v * 4
    h_ = hidden.clone().requires_grad_(True)
    w_ = weight.clone().requires_grad_(True)
    with LiveTensorBytes() as mem:
        out = linear_token_logprobs(h_, w_, labels, ids, chunk_tokens=8, chunk_columns=64)
        (out.label_logprob.sum() + out.entropy.sum() + out.ids_logprob.sum()).backward()
    assert mem.peak < full_fp32 / 4, mem.peak
    with LiveTensorBytes() as mem:
        linear_topk_logprobs(hidden, weight, labels, 8, ids, chunk_tokens=8)
    assert mem.peak < full_fp32 / 4, mem.peak


def test_no_rows() -> None:
    """A micro-batch without response tokens (an expert-parallel rank's alignment padding): empty outputs, a zero
    weight gradient, no error."""
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    labels, ids = torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)
    top = linear_topk_logprobs(hidden.detach(), weight.detach(), labels, 4, ids)
    assert top.ids.shape == (0, 4) and top.logprobs.shape == (0, 4) and top.ids_logprob.shape == (0, 3)
    out = linear_token_logprobs(hidden, weight, labels, ids)
    (out.label_logprob.sum() + out.entropy.sum() + out.ids_logprob.sum()).backward()
    assert hidden.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros_like(weight))
