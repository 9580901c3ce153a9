"""A pure-torch ExOPD loop on Hugging Face models, used only to verify that the demo task is learnable
within the trainer's step budget (the real trainer is ``megatron_opd.trainer`` on Megatron-Core).

docs/objectives.md §2 with on-policy rollouts (one update per batch, so ``ℓ_old = ℓ_S``):
``A_t = sg((ℓ_T − ℓ_S) + (λ − 1)(ℓ_T − ℓ_R))``, ``L = −Σ_t M_t A_t ℓ_S(t) / Σ_t M_t`` over the batch,
``R`` = the student's initial weights.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import torch

from megatron_opd.demo.sampling import sample, token_logprobs


@dataclasses.dataclass(frozen=True)
class OPDRecipe:
    """Trainer-like settings (the defaults are those recommended for ``configs/demo/cpu.yaml``): prompts per
    step with one sample each, AdamW with linear warmup then constant lr, gradient clipping."""

    steps: int = 60
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 5
    lam: float = 1.25
    temperature: float = 1.0
    max_new_tokens: int = 16
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def exopd_loss(
    student_lp: torch.Tensor, teacher_lp: torch.Tensor, reference_lp: torch.Tensor, mask: torch.Tensor, lam: float
) -> torch.Tensor:
    """Token-mean ExOPD policy-gradient loss; ``student_lp`` carries the gradient, the others do not."""
    advantage = ((teacher_lp - student_lp) + (lam - 1.0) * (teacher_lp - reference_lp)).detach()
    mask = mask.to(student_lp.dtype)
    return -(advantage * student_lp * mask).sum() / mask.sum().clamp(min=1.0)


def reference_opd(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    recipe: OPDRecipe,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` in place with ExOPD from ``teacher``; per-step metrics. ``R`` is a frozen copy of
    the student as given. ``on_step(step, metrics)`` is called after every optimizer step."""
    reference = copy.deepcopy(student).eval()
    teacher.eval()
    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    history = []
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup_steps))
        rollout = sample(
            student, tokenizer, rng.sample(prompts, recipe.batch_size), recipe.max_new_tokens, recipe.temperature
        )
        with torch.no_grad():
            teacher_lp = token_logprobs(teacher, rollout, recipe.temperature)
            reference_lp = token_logprobs(reference, rollout, recipe.temperature)
        student.train()
        student_lp = token_logprobs(student, rollout, recipe.temperature)
        loss = exopd_loss(student_lp, teacher_lp, reference_lp, rollout.response_mask, recipe.lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), recipe.grad_clip)
        opt.step()
        student.eval()
        mask = rollout.response_mask.bool()
        metrics = {
            "loss": loss.item(),
            "reverse_kl": (student_lp.detach() - teacher_lp)[mask].mean().item(),
            "grad_norm": grad_norm.item(),
            "response_length": rollout.response_mask.sum(-1).float().mean().item(),
        }
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return history
