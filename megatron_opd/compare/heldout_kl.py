"""The reverse KL from a student to its teacher on held-out prompts, exactly (full vocabulary).

``KL(π_S ‖ π_T) = mean_t Σ_v π_S(v|c_t) (log π_S(v|c_t) − log π_T(v|c_t))`` over the response tokens of
one student sample per prompt (at the rollout temperature, EOS included): the quantity on-policy
distillation minimizes, measured the same way for every objective (SFT included, which never scores
the student's samples during training). Hugging Face models in one process: meant for the small models
the comparison runs (the CPU demo's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_opd.demo.evaluate import read_split
from megatron_opd.demo.sampling import Rollout, encode_prompts, sample


def response_log_softmax(model: Any, rollout: Rollout, temperature: float) -> Tensor:
    """``[B, R, V]`` float64 log-probs of ``model`` at every response position of ``rollout`` (teacher forcing)."""
    logits = model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).logits
    return torch.log_softmax(logits[:, rollout.prompt_len - 1 : -1].double() / temperature, dim=-1)


def token_reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """``Σ_v p_S (log p_S − log p_T)`` over the last dim (``0 · log 0 = 0``)."""
    live = student_logp > -torch.inf
    terms = student_logp.exp() * (student_logp - teacher_logp)
    return torch.where(live, terms, torch.zeros_like(terms)).sum(-1)


@torch.no_grad()
def reverse_kl_to_teacher(
    student_dir: str | Path,
    teacher_dir: str | Path,
    data_file: str | Path,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    max_prompts: int | None = None,
    batch_size: int = 256,
) -> float:
    """Mean per-token ``KL(π_S ‖ π_T)`` (nats) on one student sample per prompt of ``data_file`` (verl parquet),
    sampled with torch seeded by ``seed``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    messages, _ = read_split(data_file, max_prompts)
    prompts = encode_prompts(tokenizer, messages)
    torch.manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        rollout = sample(student, tokenizer, prompts[start : start + batch_size], max_new_tokens, temperature)
        kl = token_reverse_kl(
            response_log_softmax(student, rollout, temperature), response_log_softmax(teacher, rollout, temperature)
        )
        mask = rollout.response_mask.bool()
        total += kl[mask].sum()
        tokens += int(mask.sum())
    return float(total / max(tokens, 1))
