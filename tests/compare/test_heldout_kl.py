"""The held-out reverse KL of ``opd compare``: the per-token formula against torch's categorical KL, zero for a
model against itself, and the whole measurement against an independent recomputation on the same samples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_opd.compare.heldout_kl import reverse_kl_to_teacher, token_reverse_kl
from megatron_opd.demo.evaluate import read_split
from megatron_opd.demo.sampling import encode_prompts, sample
from tests.tiny_runs import save_model, tokenizer_config, write_task_data
from tests.tolerance import ulps


def test_token_reverse_kl_is_categorical_kl() -> None:
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    zs[:, -2:] = -math.inf  # tokens the student never emits: 0 · log 0 = 0 whatever the teacher says
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    want = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=zs), torch.distributions.Categorical(logits=zt)
    )
    # float64 through torch's own normalization and sum: a few roundings of each of the 11 terms, at the scale of
    # the largest finite |log p|
    scale = torch.cat([ls[ls > -math.inf], lt.flatten()]).abs().max()
    torch.testing.assert_close(token_reverse_kl(ls, lt), want, rtol=0, atol=ulps(torch.float64, scale, 32))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kl")
    cfg = tokenizer_config(hidden_size=32, head_dim=8, intermediate_size=64, num_attention_heads=4)
    save_model(root / "student", cfg, seed=1)
    save_model(root / "teacher", cfg, seed=2)
    write_task_data(root)
    return root


def test_reverse_kl_of_a_model_to_itself_is_zero(models: Path) -> None:
    kl = reverse_kl_to_teacher(models / "teacher", models / "teacher", models / "data" / "test.parquet", seed=3)
    assert kl == 0.0


def test_reverse_kl_matches_a_recomputation_on_the_same_samples(models: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = models / "data" / "test.parquet"
    got = reverse_kl_to_teacher(models / "student", models / "teacher", data, temperature=0.8, max_new_tokens=6, seed=4)
    # the same samples (same seed), then token by token: each response prefix scored without padding
    tok = AutoTokenizer.from_pretrained(str(models / "student"))
    student = AutoModelForCausalLM.from_pretrained(str(models / "student"), dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(models / "teacher"), dtype=torch.float32).eval()
    prompts = encode_prompts(tok, read_split(data)[0])
    torch.manual_seed(4)
    rollout = sample(student, tok, prompts, 6, 0.8)
    kls, spreads, scale = [], [], 0.0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            n = int(rollout.response_mask[i].sum())
            response = rollout.input_ids[i, rollout.prompt_len : rollout.prompt_len + n].tolist()
            seq = torch.tensor([prompt + response])
            for t in range(n):
                zs = student(seq[:, : len(prompt) + t]).logits[0, -1].double() / 0.8
                zt = teacher(seq[:, : len(prompt) + t]).logits[0, -1].double() / 0.8
                p, gap = torch.softmax(zs, -1), torch.log_softmax(zs, -1) - torch.log_softmax(zt, -1)
                kls.append(float((p * gap).sum()))
                spreads.append(float((p * gap.abs()).sum()))
                scale = max(scale, float(zs.abs().max()), float(zt.abs().max()))
    # fp32 logits of other batch shapes (padded, batched) than these unpadded prefixes: each log-prob is off by up
    # to 64 ulps of the largest |logit / T| (as the rollout engines' log-probs), so each token's KL, Σ p (ℓ_S − ℓ_T),
    # by twice that (the two log-probs) plus Σ p |ℓ_S − ℓ_T| times it (each p moves relatively as much)
    eps = ulps(torch.float32, scale, 64)
    tol = sum((2 + spread) * eps for spread in spreads) / len(spreads)
    assert got > 0 and abs(got - sum(kls) / len(kls)) <= tol
