"""Check that the demo is learnable in the trainer's budget: teacher accuracy, student accuracy before and
after a pure-torch reference ExOPD run with trainer-like settings (``megatron_opd.demo.reference_opd``).

This is a design check for the demo's assets, not the trainer: ``opd train configs/demo/cpu.yaml`` is.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from megatron_opd.demo.build import DemoAssets, deterministic_cpu
from megatron_opd.demo.evaluate import greedy_and_sampled, read_split
from megatron_opd.demo.reference_opd import OPDRecipe, reference_opd
from megatron_opd.demo.sampling import encode_prompts


def _load(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(), tokenizer


def simulate(
    assets: DemoAssets,
    recipe: OPDRecipe | None = None,
    eval_split: str = "test",
    n_eval: int | None = None,
    eval_every: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Teacher and student accuracy on ``eval_split`` before and after ``recipe.steps`` reference ExOPD steps
    on the train split (default: ``OPDRecipe()``); ``eval_every`` > 0 also evaluates the student along the way."""
    recipe = recipe or OPDRecipe()
    eval_file = {"val": assets.val_file, "test": assets.test_file}[eval_split]
    messages, answers = read_split(eval_file, n_eval)
    train_messages, _ = read_split(assets.train_file)
    with deterministic_cpu():
        teacher, tokenizer = _load(assets.teacher)
        student, _ = _load(assets.student)
        report: dict[str, Any] = {
            "eval_split": eval_split,
            "n_eval": len(messages),
            "recipe": dataclasses.asdict(recipe),
        }
        report["teacher"] = greedy_and_sampled(teacher, tokenizer, messages, answers, recipe.seed)
        report["student_before"] = greedy_and_sampled(student, tokenizer, messages, answers, recipe.seed)
        log(f"teacher {report['teacher']}  student before {report['student_before']}")
        curve = []
        eval_s = 0.0

        def on_step(step: int, metrics: dict[str, float]) -> None:
            nonlocal eval_s
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < recipe.steps:
                t = time.perf_counter()
                acc = greedy_and_sampled(student, tokenizer, messages, answers, recipe.seed)
                eval_s += time.perf_counter() - t
                curve.append({"step": step + 1, **acc, **metrics})
                log(f"step {step + 1}: {acc}  reverse_kl {metrics['reverse_kl']:.3f}")

        t0 = time.perf_counter()
        reference_opd(student, teacher, tokenizer, encode_prompts(tokenizer, train_messages), recipe, on_step)
        report["opd_s"] = round(time.perf_counter() - t0 - eval_s, 1)  # the loop alone, without its evaluations
        report["student_after"] = greedy_and_sampled(student, tokenizer, messages, answers, recipe.seed)
        report["curve"] = curve
    log(f"student after {recipe.steps} steps {report['student_after']}  ({report['opd_s']} s of OPD)")
    return report
