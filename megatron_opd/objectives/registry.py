"""``objective.name`` -> the objective (OBJECTIVES.md §1-§7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_opd.config.errors import ConfigError
from megatron_opd.objectives.aopd import AOPDObjective
from megatron_opd.objectives.base import Objective
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.gkd import GKDObjective
from megatron_opd.objectives.lsm import LSMObjective, special_token_ids
from megatron_opd.objectives.opd import OPDObjective
from megatron_opd.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "opd": OPDObjective,
    "gopd": OPDObjective,
    "exopd": OPDObjective,
    "aopd": AOPDObjective,
    "lsm": LSMObjective,
    "gkd": GKDObjective,
    "sft": SFTObjective,
}


def build_objective(
    cfg: ObjectiveConfig,
    *,
    mini_batches_per_step: int = 1,
    temperature: float = 1.0,
    teacher_names: Sequence[str] = (),
    tokenizer: Any = None,
) -> Objective:
    """The objective of ``cfg`` (validated). ``mini_batches_per_step > 1`` selects the PPO-clip form
    under ``policy_loss: auto``; ``temperature`` is the rollout temperature (§Notation); ``teacher_names``
    (in ``teacher_index`` order) enables per-teacher metrics; ``tokenizer`` gives the default
    special-token set when ``special_token_mask`` is on and ``masked_token_ids`` is unset."""
    cfg.validate()
    masked: list[int] = []
    if cfg.special_token_mask:
        if cfg.masked_token_ids is not None:
            masked = list(cfg.masked_token_ids)
        elif tokenizer is not None:
            masked = special_token_ids(tokenizer)
        else:
            raise ConfigError(
                "objective.masked_token_ids",
                None,
                "special_token_mask is on but there is neither a masked id list nor a tokenizer to derive it from.",
                "set objective.masked_token_ids=[...] or pass the student tokenizer to build_objective.",
            )
    policy = cfg.policy_loss
    ppo_clip = policy == "ppo_clip" or (policy == "auto" and mini_batches_per_step > 1)
    return OBJECTIVES[cfg.name](
        cfg, masked_token_ids=masked, ppo_clip=ppo_clip, temperature=temperature, teacher_names=teacher_names
    )
