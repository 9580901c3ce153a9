"""token_logprobs (single process) against float64 log_softmax: values and gradients, both backends."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.kernels import token_logprobs
from megatron_opd.selftest.tolerance import logit_scale, logprob_atol
from tests.kernels.kernel_cases import (
    assert_close_grad,
    assert_close_outputs,
    make_case,
    ours_with_grad,
    reference_with_grad,
)

# (n, v, k, dtype, temperature, neg_inf): V not a multiple of any block, K = 1 and K = V, ignored rows, -inf logits
CASES = {
    "fp32_k4": (6, 37, 4, torch.float32, 1.0, False),
    "bf16_k5_temp": (5, 53, 5, torch.bfloat16, 0.7, False),
    "fp16_nok": (4, 29, None, torch.float16, 1.3, False),
    "k1": (4, 41, 1, torch.float32, 1.0, False),
    "k_equals_v": (4, 19, 19, torch.float32, 2.0, False),
    "neg_inf": (5, 45, 6, torch.float32, 1.0, True),
    "neg_inf_bf16": (5, 45, 6, torch.bfloat16, 0.9, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_grads_match_float64(backend: str, case: str) -> None:
    n, v, k, dtype, temperature, neg_inf = CASES[case]
    logits, labels, ids = make_case(hash(case) % 1000, n, v, k, dtype=dtype, neg_inf=neg_inf)
    out, grad = ours_with_grad(logits, labels, ids, temperature)
    ref, ref_grad = reference_with_grad(logits, labels, ids, temperature)
    scale = logit_scale(logits, temperature)
    assert_close_outputs(out, ref, atol=logprob_atol(scale))
    assert out.label_logprob[1] == 0  # ignored row
    if neg_inf:
        assert out.label_logprob[0] == -torch.inf
    assert_close_grad(grad, ref_grad, dtype, scale)


def test_ignored_label_gives_no_gradient(backend: str) -> None:
    logits, labels, _ = make_case(3, 4, 23, None)
    labels[:] = -100
    z = logits.clone().requires_grad_(True)
    out = token_logprobs(z, labels)
    assert (out.label_logprob == 0).all()
    out.label_logprob.sum().backward()
    assert (z.grad == 0).all()


def test_large_logits_entropy_has_no_cancellation(backend: str) -> None:
    """Logits around 1e4: the entropy must come from shifted sums, not LSE - E[x] of two large numbers."""
    logits, labels, ids = make_case(5, 3, 31, 3, scale=2.0)
    logits = logits + 1e4
    out, grad = ours_with_grad(logits, labels, ids, 1.0)
    ref, ref_grad = reference_with_grad(logits, labels, ids, 1.0)
    # at the scale of the logits' spread, not of 1e4: computed from shifted logits there is nothing larger
    scale = logit_scale(logits - logits.max(-1, keepdim=True).values, 1.0)
    torch.testing.assert_close(out.entropy.double(), ref.entropy, atol=logprob_atol(scale), rtol=0)
    assert_close_grad(grad, ref_grad, torch.float32, scale)


def test_nothing_vocab_sized_is_saved_for_backward(backend: str) -> None:
    """Only the caller's logits (no copy) and O(N·K) tensors are kept between forward and backward."""
    n, v = 8, 64
    logits, labels, ids = make_case(9, n, v, 4)
    z = logits.clone().requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(z, labels, ids)
    big = [t for t in saved if t.numel() >= n * v]
    assert len(big) == 1 and big[0].data_ptr() == z.data_ptr()
    assert sum(t.numel() for t in saved if t.data_ptr() != z.data_ptr()) <= n * (2 * 4 + 8)
    out.entropy.sum().backward()


def test_no_grad_input_and_partial_outputs(backend: str) -> None:
    logits, labels, ids = make_case(11, 4, 33, 3)
    out = token_logprobs(logits, labels, ids)  # logits without grad: plain values
    assert not out.entropy.requires_grad
    z = logits.clone().requires_grad_(True)
    token_logprobs(z, labels, ids).ids_logprob.sum().backward()  # only one output used
    ref_z = logits.double().requires_grad_(True)
    torch.log_softmax(ref_z, -1).gather(1, ids.clamp(min=0)).mul(ids >= 0).sum().backward()
    scale = logit_scale(logits, 1.0)
    assert_close_grad(z.grad, ref_z.grad, torch.float32, scale)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(labels=torch.tensor([0, 40])), ValueError, "labels/ids"),  # 40 >= V
        (dict(labels=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "labels"),
        (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels"),
        (dict(ids=torch.tensor([1, 2])), ValueError, "ids"),
        (dict(ids=torch.tensor([[1], [99]])), ValueError, "labels/ids"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(logits=torch.zeros(2, 3, 4)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 30, dtype=torch.int64)), TypeError, "logits"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, error: type, name: str) -> None:
    """Kernels raise ``TypeError`` for a wrong dtype and ``ValueError`` for a wrong shape or value, naming the
    argument first and saying how to fix it."""
    args = dict(logits=torch.zeros(2, 30), labels=torch.tensor([0, 1]), ids=None, temperature=1.0) | kwargs
    with pytest.raises(error, match=rf"^{name}[ =:]") as err:
        token_logprobs(args["logits"], args["labels"], args["ids"], temperature=args["temperature"])
    assert "; " in str(err.value)


def test_torch_path_chunks_rows(monkeypatch) -> None:
    """Several row chunks (a chunk smaller than the shard) give the same values as one chunk."""
    from megatron_opd.kernels import torch_backend

    monkeypatch.setenv("OPD_KERNELS", "torch")
    logits, labels, ids = make_case(13, 9, 50, 4)
    ref, ref_grad = reference_with_grad(logits, labels, ids, 1.0)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 120)  # 2 rows per chunk
    out, grad = ours_with_grad(logits, labels, ids, 1.0)
    scale = logit_scale(logits, 1.0)
    assert_close_outputs(out, ref, atol=logprob_atol(scale))
    assert_close_grad(grad, ref_grad, torch.float32, scale)
