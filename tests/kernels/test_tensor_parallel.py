"""TP=2 over gloo: each rank holds a vocab shard; outputs equal the float64 full-vocab reference on every rank,
the concatenated shard gradients equal the reference gradient, and the global top-k is the same on both ranks;
likewise for the fused LM head (hidden-state gradient summed over the group, weight-shard gradients concatenated),
its top-k scoring (label, ids and global top-k in one pass per chunk, from each rank's weight shard) and the loss
whose gradient the forward computes.
All cases run in one spawned world (starting one costs ~15 s on this machine)."""

from __future__ import annotations

import torch

from megatron_opd.kernels.linear_topk import TopkLogprobs, linear_topk_logprobs_reference
from megatron_opd.kernels.topk import topk_logprobs_reference
from megatron_opd.platform.spawn import spawn_world
from megatron_opd.selftest.tolerance import linear_logit_scale, logit_scale, logprob_atol
from tests.kernels.kernel_cases import (
    LINEAR_TOPK,
    assert_close_grad,
    assert_close_outputs,
    linear_reference_with_grad,
    load_result,
    loss_weights,
    make_case,
    make_linear_case,
    reference_with_grad,
    tp_worker,
    weighted_sum,
)

# name -> (backend, n, v, k_ids, k_top, dtype, temperature, splits)
CASES = {
    "torch_even_bf16": ("torch", 6, 48, 5, 6, torch.bfloat16, 0.8, None),
    "torch_uneven_fp32": ("torch", 5, 37, 4, 8, torch.float32, 1.0, [30, 7]),  # rank 1's shard narrower than k
    "triton_even_fp32": ("triton", 5, 44, 3, 4, torch.float32, 1.2, None),
    "triton_uneven_bf16": ("triton", 6, 70, 6, 3, torch.bfloat16, 1.0, [38, 32]),
}
# fused LM head: name -> (backend, n, hidden, v, k_ids, dtype, temperature, chunk_tokens)
LINEAR_CASES = {
    "linear_torch_fp32": ("torch", 7, 12, 40, 3, torch.float32, 0.9, 3),
    "linear_triton_bf16": ("triton", 5, 8, 36, 2, torch.bfloat16, 1.0, 2),
}


def test_tp2_matches_full_vocab_reference() -> None:
    inputs = {
        name: make_case(i, c[1], c[2], c[3], dtype=c[5], neg_inf=True) for i, (name, c) in enumerate(CASES.items())
    }
    work = [(c[0], *inputs[name], c[6], c[4], c[7]) for name, c in CASES.items()]
    linear_inputs = {name: make_linear_case(i, *c[1:6]) for i, (name, c) in enumerate(LINEAR_CASES.items())}
    linear_work = [(c[0], *linear_inputs[name], c[6], c[7]) for name, c in LINEAR_CASES.items()]
    env = {"TRITON_INTERPRET": "1", "OPD_TRITON_BLOCK_V": "16"}
    payloads = spawn_world(tp_worker, 2, work, linear_work, env=env, timeout_s=600)
    per_rank = [load_result(p) for p in payloads]
    for i, (name, (_, _, _, _, k_top, dtype, temperature, _)) in enumerate(CASES.items()):
        logits, labels, ids = inputs[name]
        ref, ref_grad = reference_with_grad(logits, labels, ids, temperature)
        _, ref_top = topk_logprobs_reference(logits, k_top, temperature=temperature)
        full = torch.log_softmax(logits.double() / temperature, -1)
        r0, r1 = per_rank[0][i], per_rank[1][i]
        scale = logit_scale(logits, temperature)
        atol = logprob_atol(scale)  # TP shards only reorder the reductions
        for r in (r0, r1):
            assert_close_outputs(r["out"], ref, atol=atol)
            top_ids, top = r["topk"]
            torch.testing.assert_close(top.double(), ref_top, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
            torch.testing.assert_close(full.gather(1, top_ids), ref_top, atol=atol, rtol=0)
        for a, b in zip(r0["out"] + list(r0["topk"]), r1["out"] + list(r1["topk"])):
            assert (a is None and b is None) or torch.equal(a, b), f"{name}: ranks differ"
        assert_close_grad(torch.cat([r0["grad"], r1["grad"]], dim=1), ref_grad, dtype, scale)
    for i, (name, (_, _, _, _, _, dtype, temperature, _)) in enumerate(LINEAR_CASES.items(), start=len(CASES)):
        ref, ref_dh, ref_dw = linear_reference_with_grad(*linear_inputs[name], temperature)
        hidden, weight, labels, ids = linear_inputs[name]
        ref_top = linear_topk_logprobs_reference(hidden, weight, labels, LINEAR_TOPK, ids, temperature=temperature)
        full = torch.log_softmax((hidden @ weight.t()).double() / temperature, -1)
        r0, r1 = per_rank[0][i], per_rank[1][i]
        scale = linear_logit_scale(*linear_inputs[name][:2], temperature)
        for r in (r0, r1):
            atol = logprob_atol(scale, dtype)
            assert_close_outputs(r["out"], ref, atol=atol)
            assert_close_grad(r["d_hidden"], ref_dh, dtype, scale)  # summed over the TP group
            top = TopkLogprobs(*r["topk"])
            for got, want in [(top.logprobs, ref_top.logprobs), (full.gather(1, top.ids), ref_top.logprobs)] + [
                (getattr(top, f), getattr(ref_top, f)) for f in ("label_logprob", "entropy", "ids_logprob")
            ]:
                torch.testing.assert_close(got.double(), want, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert_close_grad(torch.cat([r0["d_weight"], r1["d_weight"]]), ref_dw, dtype, scale)
        for a, b in zip(r0["topk"], r1["topk"]):
            assert torch.equal(a, b), f"{name}: ranks differ"
        # the loss with its gradient computed in the forward: the same on both ranks, shards' gradients concatenated
        (loss0, dh0, dw0), (loss1, dh1, dw1) = r0["loss"], r1["loss"]
        assert torch.equal(loss0, loss1) and torch.equal(dh0, dh1)
        weights = loss_weights(hidden.shape[0], None if ids is None else ids.shape[1])
        ref_loss = weighted_sum(ref, weights)
        # a weighted sum of outputs each within logprob_atol: within that times Σ|w|
        loss_atol = logprob_atol(scale, dtype) * sum(w.abs().sum().item() for w in weights if w is not None)
        torch.testing.assert_close(loss0.double(), ref_loss, atol=loss_atol, rtol=0)
        assert_close_grad(dh0, ref_dh, dtype, scale)
        assert_close_grad(torch.cat([dw0, dw1]), ref_dw, dtype, scale)
