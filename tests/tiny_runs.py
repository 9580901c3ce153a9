"""Tiny end-to-end run assets shared by the trainer and reliability tests: models on the demo's
character tokenizer and a small split of the demo's addition task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config


def tokenizer_config(moe: bool = False, **overrides: Any) -> Any:
    """A tiny Qwen3 config on the demo tokenizer's vocabulary and special ids."""
    from megatron_opd.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    fields = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tiny_config(moe=moe, **{**fields, **overrides})


def save_model(path: Path, config: Any, seed: int) -> torch.nn.Module:
    """A tiny random HF model with the demo tokenizer beside it."""
    from megatron_opd.demo.tokenizer import save_tokenizer

    model = save_tiny_model(path, config, seed=seed)
    save_tokenizer(path)
    return model


def write_task_data(root: Path) -> None:
    """``root/data/{train,val,test}.parquet``: additions of operands up to 12 (8 val, 8 test problems)."""
    from megatron_opd.demo.task import TaskSpec, split_problems, write_split

    (root / "data").mkdir()
    for split, problems in split_problems(TaskSpec(max_operand=12, n_val=8, n_test=8)).items():
        write_split(root / "data" / f"{split}.parquet", problems, split)
