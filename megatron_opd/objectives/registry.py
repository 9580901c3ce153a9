"""``objective.name`` -> the objective class (docs/objectives.md §1–§7), the config's validation against it,
and the objective a run trains with.

Adding an objective: its module (a subclass of ``base.Objective`` declaring its facts and ``token_losses``) and
its class in ``OBJECTIVES`` below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_opd.config.errors import ConfigError, check_choice
from megatron_opd.objectives.aopd import AOPDObjective
from megatron_opd.objectives.base import Objective
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.gkd import GKDObjective
from megatron_opd.objectives.lsm import LSMObjective, special_token_ids
from megatron_opd.objectives.opd import ExOPDObjective, GOPDObjective, OPDObjective
from megatron_opd.objectives.sft import SFTObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (OPDObjective, GOPDObjective, ExOPDObjective, AOPDObjective, LSMObjective, GKDObjective, SFTObjective)
}
OBJECTIVE_NAMES = tuple(OBJECTIVES)


def objective_class(name: str) -> type[Objective]:
    """The class of ``objective.name`` (a ConfigError for an unknown name)."""
    check_choice("objective.name", name, OBJECTIVE_NAMES)
    return OBJECTIVES[name]


def validate_objective(cfg: ObjectiveConfig, has_teacher_base: bool = True) -> None:
    """Raise :class:`ConfigError` (naming the key and the fix) on the first bad value: the name, each key's
    domain (``ObjectiveConfig.validate``), keys the objective does not read, then its own constraints."""
    cls = objective_class(cfg.name)
    cfg.validate(has_teacher_base)
    if cfg.lambda_ is not None and not cls.takes_lambda:
        takers = "|".join(n for n, c in OBJECTIVES.items() if c.takes_lambda)
        raise ConfigError(
            "objective.lambda",
            cfg.lambda_,
            f"λ is the G-OPD reward scale; objective {cfg.name!r} does not use it.",
            f"drop objective.lambda, or use objective.name={takers}.",
        )
    if cfg.support != "teacher_topk" and not cls.chooses_support:
        choosers = "|".join(n for n, c in OBJECTIVES.items() if c.chooses_support)
        has = "uses the teacher top-K" if cls.support == "teacher_topk" else "has no support"
        raise ConfigError(
            "objective.support",
            cfg.support,
            f"only {choosers} chooses its support; {cfg.name} {has}.",
            f"set objective.support=teacher_topk, or objective.name={choosers}.",
        )
    cls.validate_config(cfg)


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
    validate_objective(cfg)
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
