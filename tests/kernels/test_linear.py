"""linear_token_logprobs (fused LM head, chunked over tokens) against float64 log_softmax(h Wᵀ): values and the
gradients w.r.t. hidden states and weight, both backends."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.config.errors import ConfigError
from megatron_opd.kernels import linear_token_logprobs, token_logprobs
from tests.kernels.kernel_cases import (
    assert_close_grad,
    assert_close_outputs,
    linear_logit_scale,
    linear_ours_with_grad,
    linear_reference_with_grad,
    logprob_atol,
    make_linear_case,
)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("OPD_KERNELS", request.param)
    monkeypatch.setenv("OPD_TRITON_BLOCK_V", "16")
    return request.param


# (n, hidden, v, k, dtype, temperature, chunk_tokens): ragged last chunk, one chunk, no ids
CASES = {
    "fp32_chunks": (7, 12, 37, 4, torch.float32, 1.0, 3),
    "fp32_one_chunk_temp": (5, 8, 29, 3, torch.float32, 0.7, None),
    "bf16_chunks": (6, 16, 45, 5, torch.bfloat16, 1.0, 4),
    "fp32_no_ids": (4, 8, 33, None, torch.float32, 1.2, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(backend: str, case: str) -> None:
    n, h, v, k, dtype, temperature, chunk = CASES[case]
    hidden, weight, labels, ids = make_linear_case(len(case), n, h, v, k, dtype)
    out, d_h, d_w = linear_ours_with_grad(hidden, weight, labels, ids, temperature, chunk_tokens=chunk)
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
    with pytest.raises(ConfigError) as err:
        linear_token_logprobs(torch.zeros(3, 4), torch.zeros(10, 5), labels)
    assert err.value.key == "hidden/weight"
    with pytest.raises(ConfigError) as err:
        linear_token_logprobs(torch.zeros(3, 4), torch.zeros(10, 4, dtype=torch.bfloat16), labels)
    assert err.value.key == "hidden/weight"
    with pytest.raises(ConfigError) as err:
        linear_token_logprobs(torch.zeros(3, 4), torch.zeros(10, 4), labels, chunk_tokens=0)
    assert err.value.key == "chunk_tokens"
