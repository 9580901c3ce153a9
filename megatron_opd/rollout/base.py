"""The rollout engine protocol: what the trainer and the evaluator ask of any engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """SGLang's ``sampling_params`` subset the project uses. ``top_k=-1``: no top-k."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclasses.dataclass
class Completion:
    """One sampled response. ``logprobs[i]`` is the engine's log-prob of ``token_ids[i]`` under the
    sampling distribution's temperature (ℓ_roll in OBJECTIVES.md §6)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order (repeat a prompt for n samples)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights given as (HF name, full tensor) pairs in the HF checkpoint naming."""
        ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...
