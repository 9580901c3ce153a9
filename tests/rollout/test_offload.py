"""``OffloadedEngine`` wakes its engine in the safe order and never generates on lost weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch

from megatron_opd.rollout.base import Completion, RolloutEngine, RolloutError, SamplingParams
from megatron_opd.rollout.offload import OffloadedEngine


class Recording:
    """An engine that logs every call (and which weights it generates with)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.weights = "base"

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        self.calls.append(("generate", self.weights))
        return [Completion(p, [1], [0.0], "stop") for p in prompts]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        (name, _), *_ = list(named_tensors)
        self.weights = name
        self.calls.append(("update", name))

    def weights_dir(self) -> str | None:
        return "/sync/next"

    def update_weights_from_dir(self, path: str) -> None:
        self.weights = path
        self.calls.append(("update_from_dir", path))

    def release_memory(self) -> None:
        self.calls.append("release")
        self.weights = "lost"

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        self.calls.append(("resume", tags))

    def health(self) -> bool:
        return True

    def server_stats(self) -> dict[str, float]:
        return {"rollout/servers_up": 1.0}

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_stages_and_lost_weights() -> None:
    inner = Recording()
    student = {"version": "v0"}
    engine = OffloadedEngine(inner, lambda e: e.update_weights([(student["version"], torch.zeros(1))]))
    assert isinstance(engine, RolloutEngine)
    sp = SamplingParams()
    engine.generate([[1]], sp)  # never released: nothing to wake
    engine.release_memory()
    engine.release_memory()  # idempotent
    student["version"] = "v1"
    engine.update_weights([("v1", torch.zeros(1))])  # the weight sync: weights first, alone
    engine.generate([[1]], sp)  # then the rest
    assert inner.calls == [
        ("generate", "base"),
        "release",
        ("resume", ("weights",)),
        ("update", "v1"),
        ("resume", None),
        ("generate", "v1"),
    ]
    inner.calls.clear()
    engine.release_memory()  # a step that ends without a sync (skipped update)
    engine.generate([[1]], sp)  # pulls the student's weights itself
    assert inner.calls == ["release", ("resume", ("weights",)), ("update", "v1"), ("resume", None), ("generate", "v1")]
    inner.calls.clear()
    engine.release_memory()  # the trainer wrote the files itself (SGLang disk sync)
    engine.update_weights_from_dir(engine.weights_dir())
    engine.generate([[1]], sp)
    assert inner.calls == [
        "release",
        ("resume", ("weights",)),
        ("update_from_dir", "/sync/next"),
        ("resume", None),
        ("generate", "/sync/next"),
    ]
    assert engine.server_stats() == {"rollout/servers_up": 1.0, "rollout/memory_releases": 3.0} and engine.health()
    engine.shutdown()
    assert inner.calls[-1] == "shutdown"


def test_a_resync_that_loads_nothing_is_an_error() -> None:
    engine = OffloadedEngine(Recording(), lambda e: None)
    engine.release_memory()
    with pytest.raises(RolloutError, match="re-sync loaded no weights"):
        engine.generate([[1]], SamplingParams())
