"""Every config of the Triton kernels' autotune space, in the interpreter, against float64 on the full vocabulary.

Triton's autotuner cannot benchmark in the interpreter (it needs a GPU driver; with more than one config it raises),
so the backend launches a single config there — the first the space keeps for the width — and any config pinned by
``OPD_TRITON_*``. Here each config of ``triton_backend.CONFIGS`` is pinned in turn, on widths of two full tiles and a
ragged one and on row counts that leave the last program one row: token log-probs with entropy, ids and gradients
(also written over the logits), and the fused LM-head scoring (label, ids and top-k in one pass per chunk)."""

from __future__ import annotations

import pytest
import torch
import triton

from megatron_opd.kernels import linear_topk_logprobs, triton_backend
from megatron_opd.kernels.linear_topk import linear_topk_logprobs_reference
from megatron_opd.kernels.token_logprobs import backward_coefficients
from megatron_opd.kernels.vocab_parallel import Targets, vocab_shard
from megatron_opd.selftest.tolerance import linear_logit_scale, logit_scale, logprob_atol
from tests.kernels.kernel_cases import (
    assert_close_grad,
    assert_close_outputs,
    make_case,
    make_linear_case,
    ours_with_grad,
    reference_with_grad,
)

CONFIG_IDS = [f"{c.kwargs['BLOCK_V']}x{c.num_warps}w_rows{c.kwargs['ROWS']}" for c in triton_backend.CONFIGS]


@pytest.fixture(params=triton_backend.CONFIGS, ids=CONFIG_IDS)
def pinned(request, monkeypatch) -> triton.Config:
    config = request.param
    monkeypatch.setenv("OPD_KERNELS", "triton")
    monkeypatch.setenv("OPD_TRITON_BLOCK_V", str(config.kwargs["BLOCK_V"]))
    monkeypatch.setenv("OPD_TRITON_NUM_WARPS", str(config.num_warps))
    monkeypatch.setenv("OPD_TRITON_ROWS", str(config.kwargs["ROWS"]))
    return config


def test_token_logprobs_and_grad(pinned: triton.Config) -> None:
    block, rows = pinned.kwargs["BLOCK_V"], pinned.kwargs["ROWS"]
    n, v = rows + 1, block + 37  # two programs, the last with one row; a full tile and a ragged one
    logits, labels, ids = make_case(block + rows, n, v, 5, dtype=torch.bfloat16, neg_inf=True)
    out, grad = ours_with_grad(logits, labels, ids, 0.8)
    ref, ref_grad = reference_with_grad(logits, labels, ids, 0.8)
    scale = logit_scale(logits, 0.8)
    assert_close_outputs(out, ref, atol=logprob_atol(scale))
    assert_close_grad(grad, ref_grad, torch.bfloat16, scale)
    # the same gradient written over the logits (the fused LM head's backward does so)
    shard = vocab_shard(v, None, None)
    targets = Targets.of(labels, ids, shard)
    saved = torch.stack([logits.float().amax(1), torch.rand(n) + 3, torch.rand(n)], dim=1)
    row_vals, g_ids = backward_coefficients(saved, targets, torch.randn(n), torch.randn(n), torch.randn(n, 5))
    args = (targets.labels_local, targets.ids_local, row_vals, g_ids, 0.8)
    fresh = triton_backend.grad_logits(logits, *args)
    in_place = logits.clone()
    assert triton_backend.grad_logits(in_place, *args, out=in_place) is in_place
    assert torch.equal(in_place, fresh)


def test_linear_topk_scoring(pinned: triton.Config) -> None:
    block, rows = pinned.kwargs["BLOCK_V"], pinned.kwargs["ROWS"]
    n, v, k = rows + 1, block + 37, 8
    hidden, weight, labels, ids = make_linear_case(block + rows, n, 8, v, 3, torch.bfloat16)
    out = linear_topk_logprobs(hidden, weight, labels, k, ids, temperature=0.9, chunk_tokens=rows + 1)
    ref = linear_topk_logprobs_reference(hidden, weight, labels, k, ids, temperature=0.9)
    full = torch.log_softmax((hidden @ weight.t()).double() / 0.9, -1)
    atol = logprob_atol(linear_logit_scale(hidden, weight, 0.9), torch.bfloat16)
    torch.testing.assert_close(out.logprobs.double(), ref.logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(full.gather(1, out.ids), ref.logprobs, atol=atol, rtol=0)  # ties: any of the ids
    for name in ("label_logprob", "entropy", "ids_logprob"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name), atol=atol, rtol=0)


def test_prune_per_width_and_op() -> None:
    """Long rows keep one row per program, short rows may share one; top-k keeps one row and tiles holding whole
    groups; no tile much wider than the row."""
    prune = triton_backend._prune
    configs = triton_backend.CONFIGS

    def kept(**args) -> set[tuple[int, int, int]]:
        return {(c.kwargs["BLOCK_V"], c.num_warps, c.kwargs["ROWS"]) for c in prune(configs, {}, **args)}

    assert {rows for _, _, rows in kept(V=151936, K_POW=0, GROUP=1)} == {1}
    assert {rows for _, _, rows in kept(V=37984, K_POW=0, GROUP=1)} == {1, 4}
    assert kept(V=300, K_POW=0, GROUP=1) == {(1024, 4, 1), (1024, 4, 4)}
    top = kept(V=37984, K_POW=32, GROUP=64)
    assert {rows for _, _, rows in top} == {1} and len(top) == len(triton_backend.TILES)


def test_autotuned_kernels_name_real_arguments() -> None:
    """The autotuner silently ignores key names that are not the kernel's arguments."""
    for kernel in (triton_backend._forward_kernel, triton_backend._grad_kernel, triton_backend._grad_kernel_in_place):
        assert set(kernel.keys) <= set(kernel.arg_names), kernel.keys
        assert set(kernel.restore_value) <= set(kernel.arg_names)
        assert all(set(c.kwargs) <= set(kernel.arg_names) for c in kernel.configs)


def test_gpu_launch_goes_through_the_autotuner(monkeypatch) -> None:
    """Without a pin and outside the interpreter, the autotuner launches, its grid sized by the config's rows."""
    launched = []

    class FakeAutotuner:
        def __getitem__(self, grid):
            return lambda **args: launched.append((grid({"ROWS": 4, "BLOCK_V": 2048}), args))

    for name in ("OPD_TRITON_BLOCK_V", "OPD_TRITON_NUM_WARPS", "OPD_TRITON_ROWS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    triton_backend._launch(FakeAutotuner(), 10, {"V": 7})
    assert launched == [((3,), {"V": 7})]


def test_pins_must_be_powers_of_two(monkeypatch) -> None:
    monkeypatch.setenv("OPD_TRITON_ROWS", "3")
    with pytest.raises(ValueError, match=r"^OPD_TRITON_ROWS=3"):
        triton_backend.pinned_config()
    monkeypatch.setenv("OPD_TRITON_ROWS", "2")
    pinned = triton_backend.pinned_config()
    assert (pinned.kwargs, pinned.num_warps) == ({"BLOCK_V": 4096, "ROWS": 2}, 8)


def test_in_place_gradient_is_tuned_with_the_logits_restored(monkeypatch) -> None:
    """Tuning times each config on the real arguments: written over the logits, they are restored after each run."""
    launched = []
    monkeypatch.setattr(triton_backend, "_launch", lambda kernel, n, args: launched.append(kernel))
    logits, labels, _ = make_case(1, 3, 20, None)
    row_vals = torch.zeros(3, 6)
    triton_backend.grad_logits(logits, labels, None, row_vals, None, 1.0)
    triton_backend.grad_logits(logits, labels, None, row_vals, None, 1.0, out=logits)
    assert launched == [triton_backend._grad_kernel, triton_backend._grad_kernel_in_place]
    assert triton_backend._grad_kernel.restore_value == []
    assert triton_backend._grad_kernel_in_place.restore_value == ["grad_ptr"]
