"""Batched sampling from a Hugging Face causal LM for the demo's evaluation and reference OPD loop.

Prompts are left-padded; responses end at the first EOS (kept, it is a token the student emits) or at
``max_new_tokens``. Positions follow the attention mask, so padded and unpadded rows score identically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class Rollout:
    """A batch of prompt + response sequences, ``[B, P + R]`` with the prompt left-padded to ``P``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor  # 1 on response tokens up to and including the first EOS
    prompt_len: int
    texts: list[str]  # decoded responses without special tokens


def encode_prompts(tokenizer: Any, messages: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each conversation under the tokenizer's chat template, with the generation prompt."""
    return [
        list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for m in messages
    ]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the prompts left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only attended tokens (0 on left padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
) -> Rollout:
    """One response per prompt: greedy when ``temperature == 0``, else plain sampling (no top-k/top-p)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    options: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        options = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        **options,
    )
    model.train(was_training)
    response = out[:, ids.shape[1] :]
    ended_before = (response == eos).long().cumsum(-1) - (response == eos).long()
    response_mask = (ended_before == 0).long()
    attention_mask = torch.cat([mask, response_mask], dim=1)
    texts = tokenizer.batch_decode(response * response_mask + pad * (1 - response_mask), skip_special_tokens=True)
    return Rollout(out, attention_mask, positions(attention_mask), response_mask, ids.shape[1], texts)


def token_logprobs(model: Any, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """``[B, R]`` log-probs of the response tokens under ``model`` at ``temperature`` (teacher forcing)."""
    logits = model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).logits
    logits = logits[:, rollout.prompt_len - 1 : -1].float() / temperature
    targets = rollout.input_ids[:, rollout.prompt_len :]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
