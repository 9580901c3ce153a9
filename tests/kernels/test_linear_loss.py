"""linear_logprob_loss (the fused LM head with the gradient computed in the forward, in three matmuls) against
float64 autograd through the materialized logits: the loss, the outputs, and the gradients w.r.t. hidden states and
weight, on both backends, in ragged row chunks."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.kernels import linear_logprob_loss
from megatron_opd.kernels.linear_loss import linear_logprob_loss_reference
from megatron_opd.selftest.tolerance import linear_logit_scale, logprob_atol
from tests.kernels.kernel_cases import (
    assert_close_grad,
    assert_close_outputs,
    linear_reference_with_grad,
    loss_weights,
    make_linear_case,
    row_loss_of,
    weighted_sum,
)

# (n, hidden, v, k, dtype, temperature, chunk_tokens)
CASES = {
    "fp32_chunks": (7, 12, 37, 4, torch.float32, 0.8, 3),
    "bf16_chunks": (6, 16, 45, 5, torch.bfloat16, 1.0, 4),
    "fp32_no_ids_one_chunk": (5, 8, 33, None, torch.float32, 1.2, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_float64(backend: str, case: str) -> None:
    n, h, v, k, dtype, temperature, chunk = CASES[case]
    hidden, weight, labels, ids = make_linear_case(len(case), n, h, v, k, dtype)
    h_ = hidden.clone().requires_grad_(True)
    w_ = weight.clone().requires_grad_(True)
    loss, out = linear_logprob_loss(h_, w_, labels, row_loss_of(n, k), ids, temperature=temperature, chunk_tokens=chunk)
    assert loss.requires_grad and not out.entropy.requires_grad and loss.dtype == torch.float32
    (2.0 * loss).backward()  # an upstream gradient other than 1 scales what the forward computed
    ref, ref_dh, ref_dw = linear_reference_with_grad(hidden, weight, labels, ids, temperature)
    scale = linear_logit_scale(hidden, weight, temperature)
    atol = logprob_atol(scale, dtype)
    assert_close_outputs(out, ref, atol=atol)
    weights = loss_weights(n, k)
    ref_loss = weighted_sum(ref, weights)
    # a weighted sum of outputs each within atol: within atol times Σ|w|
    loss_atol = atol * sum(w.abs().sum().item() for w in weights if w is not None)
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_atol, rtol=0)
    assert_close_grad(h_.grad, 2.0 * ref_dh, dtype, scale)
    assert_close_grad(w_.grad, 2.0 * ref_dw, dtype, scale)


def test_reference_and_frozen_weight(backend: str) -> None:
    """The module's reference gives the same loss; a frozen weight gets no gradient, the hidden states still do."""
    hidden, weight, labels, ids = make_linear_case(2, 6, 8, 29, 3, torch.float32)
    row_loss = row_loss_of(6, 3)
    h_ = hidden.clone().requires_grad_(True)
    loss, _ = linear_logprob_loss(h_, weight, labels, row_loss, ids, chunk_tokens=4)
    ref_loss, _ = linear_logprob_loss_reference(hidden, weight, labels, row_loss, ids)
    weights = loss_weights(6, 3)
    loss_atol = logprob_atol(linear_logit_scale(hidden, weight, 1.0)) * sum(w.abs().sum().item() for w in weights)
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_atol, rtol=0)  # chunked vs one matmul
    loss.backward()
    assert h_.grad is not None and weight.grad is None


def test_bad_row_loss() -> None:
    hidden, weight, labels, _ = make_linear_case(3, 4, 8, 20, None, torch.float32)
    with pytest.raises(TypeError, match=r"^row_loss"):
        linear_logprob_loss(hidden, weight, labels, "opd")
