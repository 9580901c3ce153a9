"""Fault injection for ``tests/reliability`` (docs/reliability.md). Inert unless ``OPD_FAULT`` is set.

``OPD_FAULT=PHASE@STEP`` SIGKILLs the driver when it reaches that point of that step;
``OPD_FAULT=PHASE@STEP:GROUP:RANK[:SIGNAL]`` sends that worker rank's process SIGKILL (or SIGNAL, e.g.
SIGSTOP for a hung rank) instead (it must run on the driver's node) and lets the driver carry on
into it. The points (see ``driver.py``):

- ``rollout``: the step's rollouts are generated (they exist only in the driver's memory);
- ``score``: teachers/references have scored them, the student has not trained;
- ``train``: the optimizer step is applied in the student's ranks, nothing is synced or saved;
- ``checkpoint``: the student's ranks wrote their shards into the temporary checkpoint directory,
  the completion marker is not written yet.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_opd.trainer.worker_group import WorkerGroup

ENV = "OPD_FAULT"
log = logging.getLogger("megatron_opd.train")


def fault_point(phase: str, step: int, groups: Iterable[WorkerGroup] = ()) -> None:
    """Do what ``OPD_FAULT`` asks for at ``phase`` of ``step``; nothing when it names another point."""
    spec = os.environ.get(ENV, "")
    point, _, target = spec.partition(":")
    if point != f"{phase}@{step}":
        return
    if not target:
        log.warning("fault injection (%s=%s): SIGKILL of the driver", ENV, spec)
        os.kill(os.getpid(), signal.SIGKILL)
    name, rank, sig = [*target.split(":"), "SIGKILL"][:3]
    group = next(g for g in groups if g.name == name)
    pid = group.ping()[int(rank)]["pid"]
    log.warning("fault injection (%s=%s): %s to group %r rank %s (pid %d)", ENV, spec, sig, name, rank, pid)
    os.kill(pid, signal.Signals[sig])
