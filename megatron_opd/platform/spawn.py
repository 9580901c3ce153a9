"""Run a function on every rank of a fresh local world (one process per rank).

Used by tests (gloo worlds of 2-4 on CPU) and by tools that need a small world on one host. The
function is called as ``fn(*args)`` after ``init_distributed``; what rank ``r`` returns is
element ``r`` of the result. An exception on any rank is re-raised here with that rank's
traceback.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_opd.platform.distributed import DistEnv, free_port, init_distributed, shutdown


class WorkerError(RuntimeError):
    """A rank of a spawned world raised."""


def _entry(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    env: dict[str, str],
    queue: Any,
) -> None:
    os.environ.update(env)
    try:
        init_distributed(DistEnv(rank, world_size, rank, "127.0.0.1", port, "spawn"), timeout_s=300)
        result = fn(*args)
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            shutdown()
        except Exception:
            pass


def spawn_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ranks 0..world_size-1 and return their results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, env, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=5 if errors or len(results) == world_size else 1)
        if p.is_alive():
            p.kill()
    if errors:
        raise WorkerError("\n".join(errors))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        codes = {r: procs[r].exitcode for r in missing}
        raise WorkerError(f"ranks {missing} returned nothing (exit codes {codes}; timeout {timeout_s}s)")
    return [results[r] for r in range(world_size)]
