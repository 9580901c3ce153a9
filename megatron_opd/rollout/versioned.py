"""The trainer's view of its rollout engine: engine requests and weight updates take turns, and every sampled
token records the weight version that sampled it (docs/async.md).

Version ``v`` is the student after ``v`` optimizer steps. A weight update waits until the requests in flight
have returned (none is dropped) and no request starts while it runs, so each request samples under one known
version. A batch is sent as requests of at most ``request_rows`` rows, so an update waits for one request, not
a whole batch. With ``partial`` (``rollout.partial``) an update aborts the requests in flight instead
(SGLang's ``/abort_request``, :class:`~megatron_opd.rollout.base.AbortableEngine`); their unfinished rows are
resumed under the new weights with the partial response appended to the prompt and the remaining token budget,
as slime resumes aborted samples, and each token keeps the version that sampled it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from megatron_opd.config.errors import ConfigError
from megatron_opd.rollout.base import MAX_SEED, AbortableEngine, Completion, RolloutEngine, SamplingParams

RESUME_SEED_STRIDE = 1_000_003  # the seeds of a resumed row's next part: away from the first part's


@dataclasses.dataclass
class _Row:
    """One prompt's response as it grows over requests (more than one when an update aborted it)."""

    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None

    def extend(self, c: Completion, version: int) -> None:
        self.tokens += c.token_ids
        self.logprobs += c.logprobs
        self.versions += [version] * len(c.token_ids)
        self.finish = c.finish_reason

    def completion(self) -> Completion:
        return Completion(self.prompt, self.tokens, self.logprobs, self.finish or "length", self.versions)


@dataclasses.dataclass
class EngineStats:
    """Cumulative counters (the driver logs their per-step differences)."""

    request_wait_s: float = 0.0  # requests waiting for a weight update to finish
    update_wait_s: float = 0.0  # weight updates waiting for the requests in flight
    aborted_requests: int = 0  # requests an update aborted (``partial``)
    resumed_rows: int = 0  # rows resumed under newer weights (``partial``)

    def minus(self, earlier: EngineStats) -> dict[str, float]:
        return {f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(self)}


class VersionedEngine:
    """A :class:`~megatron_opd.rollout.base.RolloutEngine` around ``engine`` whose completions carry
    ``weight_versions``; weight updates go through :meth:`update`."""

    def __init__(
        self, engine: RolloutEngine, *, request_rows: int | None = None, partial: bool = False, version: int = 0
    ) -> None:
        if partial and not isinstance(engine, AbortableEngine):
            raise ConfigError(
                "rollout.partial",
                True,
                f"the {type(engine).__name__} engine cannot abort a running generation.",
                "use rollout.engine=hf or sglang, or rollout.partial=false.",
            )
        self.engine, self.request_rows, self.partial = engine, request_rows, partial
        self.version = version
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._requests = 0  # engine requests in flight
        self._updating = False
        self._stopped = False

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """As ``engine.generate`` (row ``i`` samples with seed ``sampling.seed + i``), in requests of at most
        ``request_rows`` rows, each under the version current when it starts."""
        rows = [_Row(list(p)) for p in prompts]
        size = self.request_rows or max(len(rows), 1)
        for start in range(0, len(rows), size):
            seed = None if sampling.seed is None else (sampling.seed + start) % MAX_SEED
            self._complete(rows[start : start + size], dataclasses.replace(sampling, seed=seed))
        return [r.completion() for r in rows]

    def _complete(self, rows: list[_Row], sampling: SamplingParams) -> None:
        """Sample ``rows`` to the end; rows an update aborted continue under the new weights, grouped by the
        budget they have left."""
        self._request(rows, sampling)
        resumes = 0
        while unfinished := [r for r in rows if r.finish == "abort" and self.partial and not self._stopped]:
            resumes += 1
            self.stats.resumed_rows += len(unfinished)
            by_budget: dict[int, list[_Row]] = defaultdict(list)
            for r in unfinished:
                by_budget[sampling.max_new_tokens - len(r.tokens)].append(r)
            for budget, group in by_budget.items():
                seed = None if sampling.seed is None else (sampling.seed + resumes * RESUME_SEED_STRIDE) % MAX_SEED
                if budget <= 0:
                    for r in group:
                        r.finish = "length"
                    continue
                self._request(group, dataclasses.replace(sampling, max_new_tokens=budget, seed=seed))

    def _request(self, rows: list[_Row], sampling: SamplingParams) -> None:
        """One engine request: prompt + response so far of each row, under one weight version."""
        with self._cond:
            t0 = time.perf_counter()
            self._cond.wait_for(lambda: not self._updating)
            self.stats.request_wait_s += time.perf_counter() - t0
            self._requests += 1
            version = self.version
        try:
            completions = self.engine.generate([r.prompt + r.tokens for r in rows], sampling)
        finally:
            with self._cond:
                self._requests -= 1
                self._cond.notify_all()
        for r, c in zip(rows, completions):
            r.extend(c, version)

    def wait_for_version(self, version: int, timeout_s: float | None = None) -> bool:
        """Block until the weights are at least ``version`` (at most ``timeout_s``); whether they are."""
        with self._cond:
            return self._cond.wait_for(lambda: self.version >= version, timeout_s)

    def stop(self) -> None:
        """End the generations in flight for good (the run stops): abort them where the engine can; their rows
        are not resumed."""
        self._stopped = True
        if isinstance(self.engine, AbortableEngine):
            self.engine.abort()

    # -- weights ---------------------------------------------------------------------------------
    def update(self, send: Callable[[RolloutEngine], None], version: int | None = None) -> None:
        """``send(engine)`` the new weights once no request is in flight (``partial``: after aborting them);
        the weights are then ``version`` (default: one more than before)."""
        with self._cond:
            self._updating = True
            t0 = time.perf_counter()
            if self.partial and self._requests:
                self.engine.abort()  # type: ignore[attr-defined]
                self.stats.aborted_requests += self._requests
            self._cond.wait_for(lambda: self._requests == 0)
            self.stats.update_wait_s += time.perf_counter() - t0
        sent = False
        try:
            send(self.engine)
            sent = True
        finally:
            with self._cond:
                if sent:
                    self.version = self.version + 1 if version is None else version
                self._updating = False
                self._cond.notify_all()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.update(lambda e: e.update_weights(named_tensors))

    def weights_dir(self) -> str | None:
        return self.engine.weights_dir()

    def update_weights_from_dir(self, path: str) -> None:
        self.update(lambda e: e.update_weights_from_dir(path))

    # -- the rest of the engine ------------------------------------------------------------------
    def health(self) -> bool:
        return self.engine.health()

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self, tags: tuple[str, ...] | None = None) -> None:
        self.engine.resume_memory(tags)

    def server_stats(self) -> dict[str, float]:
        return self.engine.server_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()
