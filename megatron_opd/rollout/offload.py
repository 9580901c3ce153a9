"""``OffloadedEngine``: a rollout engine that gives its accelerator memory back between rollouts.

In a colocated run (``rollout.offload_when_idle``) the rollout servers share the GPUs with the
student and the teachers. After each rollout the driver calls ``release_memory()`` (weights and KV
cache go; scoring and training get the memory), and the engine wakes itself up in stages so the
peak stays low:

1. ``update_weights`` (the trainer's weight sync): resume ``weights`` only, then load them;
2. ``generate``: resume everything else (the KV cache), then generate.

Released weights may come back without their values (SGLang without a CPU backup), so when a step
ends without a weight sync (a skipped update) the next ``generate`` first runs the trainer's weight
sync itself (``resync(engine)``). Never generates on lost weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from megatron_opd.rollout.base import Completion, RolloutEngine, RolloutError, SamplingParams

if TYPE_CHECKING:
    from megatron_opd.rollout.sglang.weight_sync import WeightSender

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class OffloadedEngine:
    """A :class:`~megatron_opd.rollout.base.RolloutEngine` around ``engine``; ``resync(self)`` sends
    the current student weights into it (``update_weights`` or ``update_weights_from_dir``) when
    they must be re-sent."""

    def __init__(self, engine: RolloutEngine, resync: Callable[[OffloadedEngine], None]) -> None:
        self.engine, self.resync = engine, resync
        self.released = False  # any memory given back
        self.weights_lost = False  # released weights not loaded again yet
        self.releases = 0

    def release_memory(self) -> None:
        if not self.released:
            self.engine.release_memory()
            self.released = self.weights_lost = True
            self.releases += 1

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        """Everything back, weights valid (``tags`` are resumed in the safe order regardless)."""
        if self.weights_lost:
            self.resync(self)
            if self.weights_lost:
                raise RolloutError("the weight re-sync loaded no weights into the rollout engine")
        if self.released:
            self.engine.resume_memory(None)
            self.released = False

    def update_weights(self, named_tensors: NamedTensors) -> None:
        self._resume_weights()
        self.engine.update_weights(named_tensors)
        self.weights_lost = False

    def update_weights_from_sender(self, sender: WeightSender) -> None:
        """SGLang's distributed sync from another process (the engine must have the method)."""
        self._resume_weights()
        self.engine.update_weights_from_sender(sender)  # type: ignore[attr-defined]
        self.weights_lost = False

    def weights_dir(self) -> str | None:
        return self.engine.weights_dir()

    def update_weights_from_dir(self, path: str) -> None:
        self._resume_weights()
        self.engine.update_weights_from_dir(path)
        self.weights_lost = False

    def _resume_weights(self) -> None:
        if self.weights_lost:
            self.engine.resume_memory(("weights",))

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        self.resume_memory()
        return self.engine.generate(prompts, sampling)

    def health(self) -> bool:
        return self.engine.health()

    def server_stats(self) -> dict[str, float]:
        return {**self.engine.server_stats(), "rollout/memory_releases": float(self.releases)}

    def shutdown(self) -> None:
        self.engine.shutdown()
