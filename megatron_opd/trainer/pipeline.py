"""The asynchronous rollout pipeline (``trainer.max_staleness = k >= 1``, docs/async.md).

A thread draws the prompts of each step in order and has them generated (``produce``) while the learner
trains on earlier batches. The batch of step ``t`` starts once the engine holds version ``t - 1 - k`` or newer
(version ``v``: the student after ``v`` optimizer steps; the learner trains step ``t`` from version ``t - 1``), so
no token is more than ``k`` versions older than the student that learns from it; at most ``k`` batches are
generated ahead. Each batch carries the data loader's state after its prompts were drawn: what a checkpoint
after its step saves, so a resumed run draws the next prompts exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.versioned import VersionedEngine
from megatron_opd.trainer.batch import Sample

POLL_S = 0.5  # how often a waiting producer checks whether the pipeline was closed


@dataclasses.dataclass
class RolloutBatch:
    step: int  # the step that trains on it
    samples: list[Sample]
    data_state: dict[str, Any]  # the prompt loader's state once this batch's prompts were drawn
    produce_s: float  # generating (and scoring ahead) this batch
    bound_wait_s: float  # waiting for the weights to come within max_staleness of the step


class RolloutPipeline:
    """Batches of steps ``first..last`` generated ahead of the learner, in a thread."""

    def __init__(
        self,
        engine: VersionedEngine,
        loader: Any,
        produce: Callable[[int, list[Any]], list[Sample]],
        max_staleness: int,
        first: int,
        last: int,
    ) -> None:
        self.engine, self.loader, self.produce, self.max_staleness = engine, loader, produce, max_staleness
        self._ready: queue.Queue[RolloutBatch | BaseException] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first, last), name="opd-rollouts", daemon=True)
        self._thread.start()

    def _run(self, first: int, last: int) -> None:
        try:
            for step in range(first, last + 1):
                t0 = time.perf_counter()
                while not self._closed.is_set() and self.engine.version < step - 1 - self.max_staleness:
                    self.engine.wait_for_version(step - 1 - self.max_staleness, timeout_s=POLL_S)
                if self._closed.is_set():
                    return
                waited = time.perf_counter() - t0
                prompts = self.loader.next_batch()
                data_state = self.loader.state_dict()
                t0 = time.perf_counter()
                samples = self.produce(step, prompts)
                self._ready.put(RolloutBatch(step, samples, data_state, time.perf_counter() - t0, waited))
        except BaseException as e:  # handed to the learner, which raises it
            self._ready.put(e)

    def take(self, step: int) -> RolloutBatch:
        """The batch of ``step`` (waits for it); an error of the rollout thread is raised here."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise RolloutError(f"generating the rollouts of step {step} failed: {item}") from item
        if item.step != step:
            raise RuntimeError(f"the rollout pipeline produced step {item.step} where step {step} was due")
        return item

    def close(self, timeout_s: float) -> None:
        """Stop generating: batches not trained on are discarded (a resumed run generates them again from its
        checkpoint, docs/async.md). A running request is aborted where the engine can, otherwise waited for."""
        self._closed.set()
        if self._thread.is_alive():
            self.engine.stop()
        self._thread.join(timeout_s)
