"""Tiny random Qwen3 / Qwen3-MoE models for tests, benchmarks and the CPU demo (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_config(moe: bool = False, **overrides: Any) -> Any:
    """A few-layer ``Qwen3Config`` / ``Qwen3MoeConfig``; ``overrides`` replace any field."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    fields: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if moe:
        fields.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    else:
        fields.update(intermediate_size=96)
    fields.update(overrides)
    return Qwen3MoeConfig(**fields) if moe else Qwen3Config(**fields)


def save_tiny_model(out_dir: str | Path, config: Any, seed: int = 0, init_std: float | None = None) -> torch.nn.Module:
    """Build a random HF model from ``config`` with a fixed seed, save it to ``out_dir``, return it.

    ``init_std``: std of the normal init of all matrices (HF's default is ``initializer_range``);
    norms get small random perturbations around 1 so a mapping that mixes them up is caught.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif init_std is not None:
                p.normal_(0.0, init_std)
    model.save_pretrained(str(out_dir))
    return model.eval()
