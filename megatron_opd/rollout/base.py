"""The rollout engine protocol: what the trainer and the evaluator ask of any engine.

Semantics shared by every engine (they are SGLang's):

- ``temperature == 0`` is greedy decoding; the returned log-probs are then those of the plain
  softmax (temperature 1).
- ``Completion.logprobs[i]`` is ``log_softmax(logits / temperature)[token_ids[i]]`` over the whole
  vocabulary, BEFORE top-k / top-p truncation: the trainer's ``ℓ_old`` and the teachers' scores are
  computed the same way (at the rollout temperature, untruncated), so token-level rollout
  correction compares like with like. SGLang's ``/generate`` returns exactly this as
  ``output_token_logprobs``; the vLLM engine picks the ``logprobs_mode`` that yields it and reports
  NaN for a call where vLLM cannot (``vllm_engine.exact_logprobs``).
- The completion includes the stop token (EOS or a stop id) that ended it.
- Seeds: row ``i`` of a ``generate`` call samples with seed ``sampling.seed + i``; with
  ``seed=None`` each engine draws per-row seeds from its own generator (seeded at construction).
  A row's tokens therefore do not depend on how the engine batches or which server it lands on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from megatron_opd.rollout.config import RolloutConfig

FINISH_REASONS = ("stop", "length", "abort")
# SGLang's releasable GPU memory regions (srt/constants.py GPU_MEMORY_ALL_TYPES); tags=None means all of them
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
MAX_SEED = 2**62  # seeds stay well inside int64 after adding a row index


class RolloutError(RuntimeError):
    """A rollout that could not be produced (after retries), with what failed and the fix."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """SGLang's ``sampling_params`` subset the project uses. ``top_k=-1``: no top-k."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1].")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be -1 (off) or >= 1.")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0.")

    @classmethod
    def from_config(cls, cfg: RolloutConfig, seed: int | None = None, **overrides: object) -> SamplingParams:
        """The rollout config's sampling parameters (``overrides`` replace fields, e.g. for evaluation)."""
        fields: dict[str, object] = dict(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens,
            stop_token_ids=tuple(cfg.stop_token_ids),
            seed=seed,
        )
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]


def row_seeds(sampling: SamplingParams, n: int, rng: np.random.Generator) -> list[int]:
    """The per-row seeds of a ``generate`` call of ``n`` rows (see the module docstring)."""
    if sampling.seed is not None:
        return [(sampling.seed + i) % MAX_SEED for i in range(n)]
    return [int(s) for s in rng.integers(0, MAX_SEED, size=n)]


@dataclasses.dataclass
class Completion:
    """One sampled response. ``logprobs[i]`` is the engine's log-prob of ``token_ids[i]`` under the
    sampling distribution's temperature (ℓ_roll in docs/objectives.md §6)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    # [len(token_ids)] the weight version that sampled each token (asynchronous runs, ``VersionedEngine``)
    weight_versions: list[int] | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order (repeat a prompt for n samples)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights given as (HF name, full tensor) pairs in the HF checkpoint naming."""
        ...

    def health(self) -> bool: ...

    def weights_dir(self) -> str | None:
        """A fresh directory the trainer may write the next weights to (an HF safetensors
        directory, then :meth:`update_weights_from_dir`), or ``None``: send them to
        :meth:`update_weights`. SGLang's disk sync: rank 0 of the student writes the files itself."""
        ...

    def update_weights_from_dir(self, path: str) -> None:
        """Load the weights of the HF directory ``path`` (from :meth:`weights_dir`: the engine
        owns it from here)."""
        ...

    def release_memory(self) -> None:
        """Free the engine's accelerator memory (weights and KV cache) until ``resume_memory``.
        Released weights may come back without their values (SGLang without a CPU backup): update
        them after resuming ``"weights"``. Between rollouts of a colocated run."""
        ...

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        """Take back the memory of ``tags`` (:data:`MEMORY_TAGS`; ``None``: all that is still
        released). A region that is not released is left alone (SGLang would crash on resuming it)."""
        ...

    def server_stats(self) -> dict[str, float]:
        """Cumulative fault counters for the step metrics (``rollout/server_failures``, ...); ``{}``
        for in-process engines."""
        ...

    def shutdown(self) -> None: ...


@runtime_checkable
class AbortableEngine(Protocol):
    """An engine whose running generations can be stopped early (SGLang's ``/abort_request`` with
    ``abort_all``): each unfinished row of the ``generate`` calls in flight then returns what it has sampled so
    far, with ``finish_reason == "abort"``. ``rollout.partial`` resumes such rows after a weight update."""

    def abort(self) -> None: ...
