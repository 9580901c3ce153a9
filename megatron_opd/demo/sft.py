"""Supervised fine-tuning of a Hugging Face causal LM on demo problems: how the teacher and student are made.

Plain torch + transformers (not Megatron): cross-entropy on the response tokens (``\\boxed{..}`` plus the
EOS) of randomly drawn training questions, AdamW, linear warmup then cosine decay, gradient clipping. The
answer is drawn afresh each time a question is drawn (a tutor may be inconsistent).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any

import torch

from megatron_opd.demo.sampling import encode_prompts

IGNORE_INDEX = -100

Tutor = Callable[[int, random.Random], str]  # (question index, rng) -> assistant text


@dataclasses.dataclass(frozen=True)
class SFTRecipe:
    """Optimizer and schedule of one SFT run. Part of the build recipe (changing it rebuilds)."""

    steps: int
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and ``labels`` set only on response tokens."""
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_at(recipe: SFTRecipe, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    warmup = min(1.0, (step + 1) / max(1, recipe.warmup_steps))
    return recipe.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * step / recipe.steps))


def sft_train(model: Any, tokenizer: Any, questions: list[str], tutor: Tutor, recipe: SFTRecipe) -> list[float]:
    """Train ``model`` in place for ``recipe.steps`` steps on batches of ``questions`` (user messages)
    answered by ``tutor``; the per-step losses."""
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in questions])
    responses: dict[str, list[int]] = {}  # answer text -> token ids + EOS

    def response_ids(text: str) -> list[int]:
        if text not in responses:
            responses[text] = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return responses[text]

    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    model.train()
    losses = []
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step)
        drawn = rng.sample(range(len(questions)), recipe.batch_size)
        batch = collate([(prompts[i], response_ids(tutor(i, rng))) for i in drawn], tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
