"""The reference ExOPD loss and loop, the sampling helpers, measure_accuracy (tiny models: seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.demo.reference_opd import OPDRecipe, exopd_loss, reference_opd
from megatron_opd.demo.sampling import encode_prompts, left_pad, positions, sample, token_logprobs
from megatron_opd.demo.tokenizer import build_tokenizer
from tests.tolerance import logit_magnitude, ulps


def test_exopd_loss_matches_objectives_section_2() -> None:
    s = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    t = torch.tensor([[-0.5, -3.0, -0.1]])
    r = torch.tensor([[-1.5, -1.0, -0.7]])
    mask = torch.tensor([[1, 1, 0]])
    lam = 1.25
    loss = exopd_loss(s, t, r, mask, lam)
    adv = [(t[0, i] - s[0, i] + (lam - 1) * (t[0, i] - r[0, i])).item() for i in range(2)]
    # fp32 against float64 on the same inputs: a few roundings of terms no larger than 4
    tol = ulps(torch.float32, 4.0, 8)
    assert abs(loss.item() - -(adv[0] * -1.0 + adv[1] * -2.0) / 2) <= tol
    loss.backward()  # the advantage is a constant: d loss / d ℓ_S = -A_t / Σ M
    torch.testing.assert_close(s.grad, torch.tensor([[-adv[0] / 2, -adv[1] / 2, 0.0]]), atol=tol, rtol=0)


def test_left_pad_positions() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.fixture(scope="module")
def tiny_models() -> tuple:
    from transformers import AutoModelForCausalLM

    from megatron_opd.demo.build import ModelRecipe, model_config
    from megatron_opd.demo.sft import SFTRecipe

    tok = build_tokenizer()
    cfg = model_config(ModelRecipe(sft=SFTRecipe(steps=1), hidden_size=32, head_dim=8, intermediate_size=64), tok)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), AutoModelForCausalLM.from_config(cfg).eval(), tok


def test_sampled_logprobs_match_teacher_forcing(tiny_models: tuple) -> None:
    student, _, tok = tiny_models
    prompts = encode_prompts(tok, [[{"role": "user", "content": q}] for q in ("3+4=", "37+48=")])
    torch.manual_seed(0)
    ro = sample(student, tok, prompts, max_new_tokens=6, temperature=1.0)
    assert ro.input_ids.shape[1] == ro.prompt_len + ro.response_mask.shape[1]
    ended = (ro.input_ids[:, ro.prompt_len :] == tok.eos_token_id) & ro.response_mask.bool()
    assert (ended.sum(-1) <= 1).all()  # the mask stops at the first EOS, which it keeps
    lp = token_logprobs(student, ro)
    # the left-padded row scores as the same sequence without padding
    n = int(ro.response_mask[0].sum())
    response = ro.input_ids[0, ro.prompt_len : ro.prompt_len + n].tolist()
    seq = torch.tensor([prompts[0] + response])
    with torch.no_grad():
        logits = student(input_ids=seq).logits[0, len(prompts[0]) - 1 : -1]
    direct = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    # the same tokens' fp32 log-probs through another batch shape (left-padded, batched): as the rollout engine's
    tol = ulps(torch.float32, logit_magnitude(student, [seq[0].tolist()]), 64)
    assert ro.prompt_len > len(prompts[0])
    torch.testing.assert_close(direct, lp[0, :n].detach(), atol=tol, rtol=0)


def test_reference_opd_runs_and_keeps_the_reference_frozen(tiny_models: tuple) -> None:
    student, teacher, tok = tiny_models
    before = {k: v.clone() for k, v in student.state_dict().items()}
    prompts = encode_prompts(tok, [[{"role": "user", "content": f"{i}+{i}="}] for i in range(8)])
    history = reference_opd(student, teacher, tok, prompts, OPDRecipe(steps=2, batch_size=4, max_new_tokens=4))
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
