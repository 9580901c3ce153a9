"""Held-out accuracy of a Hugging Face model directory on a demo (verl-schema) parquet file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_opd.demo.sampling import encode_prompts, sample
from megatron_opd.rewards.math import score_math

MAX_NEW_TOKENS = 16  # "\boxed{198}" is 11 characters, plus the EOS: room for a few stray tokens


def read_split(path: str | Path, n: int | None = None) -> tuple[list[list[dict[str, str]]], list[str]]:
    """The first ``n`` rows (all when None) of a verl parquet file: ``(chat messages, ground truths)``."""
    import pyarrow.parquet as pq

    rows = pq.read_table(str(path), columns=["prompt", "reward_model"]).to_pylist()[:n]
    return [r["prompt"] for r in rows], [str(r["reward_model"]["ground_truth"]) for r in rows]


def accuracy(
    model: Any,
    tokenizer: Any,
    messages: list[list[dict[str, str]]],
    answers: list[str],
    temperature: float = 0.0,
    batch_size: int = 256,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> float:
    """Mean math-verify score (the trainer's reward) of one response per problem, greedy when temperature 0."""
    prompts = encode_prompts(tokenizer, messages)
    correct = 0.0
    for start in range(0, len(prompts), batch_size):
        rollout = sample(model, tokenizer, prompts[start : start + batch_size], max_new_tokens, temperature)
        correct += sum(score_math(t, a) for t, a in zip(rollout.texts, answers[start : start + batch_size]))
    return correct / len(prompts)


def greedy_and_sampled(
    model: Any, tokenizer: Any, messages: list[list[dict[str, str]]], answers: list[str], seed: int
) -> dict[str, float]:
    """``{"greedy": .., "t1": ..}``: greedy accuracy and temperature-1 accuracy (one sample per problem,
    torch seeded with ``seed``)."""
    torch.manual_seed(seed)
    return {
        "greedy": accuracy(model, tokenizer, messages, answers, 0.0),
        "t1": accuracy(model, tokenizer, messages, answers, 1.0),
    }


def measure_accuracy(
    model_dir: str | Path,
    data_file: str | Path,
    n: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> float:
    """Accuracy of the HF model in ``model_dir`` (with its tokenizer) on the first ``n`` problems of ``data_file``.

    ``temperature`` 0 is greedy decoding; otherwise one sample per problem with torch seeded by ``seed``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    messages, answers = read_split(data_file, n)
    torch.manual_seed(seed)
    return accuracy(model, tokenizer, messages, answers, temperature)
