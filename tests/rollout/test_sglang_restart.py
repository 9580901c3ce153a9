"""Servers the ``sglang`` engine launched (``opd serve`` subprocesses here) are restarted when they
die or hang: on the latest weights (disk sync), or on the base weights and idle until the next
update rebuilds the process group (distributed sync); dropped after ``max_restarts``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.rollout.base import RolloutError
from megatron_opd.rollout.hf_engine import HFEngine
from megatron_opd.rollout.sglang.client import SGLangEngine
from megatron_opd.rollout.sglang.launcher import ServerProcesses
from tests.rollout.conftest import serve_commands
from tests.rollout.test_sglang_client import PROMPTS, SP, config, same

pytestmark = pytest.mark.slow


def launched(model_dir: Path, count: int, log_dir: Path, **kw) -> SGLangEngine:
    """An engine owning ``count`` fresh ``opd serve`` processes of ``model_dir``."""
    cfg = config([], **kw)
    cfg.sglang.startup_timeout_s = 120.0
    procs = ServerProcesses(serve_commands(model_dir, count, name="owned"), log_dir).start(120.0)
    return SGLangEngine(cfg, str(model_dir), processes=procs)


def pids(engine: SGLangEngine) -> list[int]:
    assert engine.processes is not None
    return [p.pid for p in engine.processes.procs]


def test_killed_server_restarts_on_the_latest_weights(
    tol: float, dense_dir: Path, dense_dir_b: Path, tmp_path: Path
) -> None:
    engine = launched(dense_dir, 2, tmp_path / "logs")
    engine.cfg.sglang.weight_sync_dir = str(tmp_path / "sync")
    procs = engine.processes
    assert procs is not None
    try:
        engine.update_weights(HFCheckpointReader(dense_dir_b).items())
        kept = list((tmp_path / "sync").iterdir())
        assert len(kept) == 1  # the latest weights stay on disk while servers may need a restart
        old = pids(engine)
        procs.kill(1)
        want_b = HFEngine(dense_dir_b, seed=0).generate(PROMPTS, SP)
        same(engine.generate(PROMPTS, SP), want_b, tol)  # served by server 0 while server 1 restarts
        engine.wait_for_restarts()
        victim = engine.servers[1]
        assert victim.up and victim.restarts == 1 and not victim.stale and pids(engine)[1] != old[1]
        assert procs.commands[1].command[procs.commands[1].command.index("--model-path") + 1] == str(kept[0])
        stats = engine.server_stats()  # each request in flight to it failed; one restart for them all
        assert {f.url for f in engine.failures} == {victim.url}
        assert stats == {
            "rollout/server_failures": float(len(engine.failures)),
            "rollout/server_restarts": 1.0,
            "rollout/servers_up": 2.0,
        }
        alone = SGLangEngine(config([victim.url]), "unused")  # the restarted server holds the new weights
        same(alone.generate(PROMPTS, SP), want_b, tol)

        engine.update_weights(HFCheckpointReader(dense_dir).items())  # both get it; only the newest dir stays
        now = list((tmp_path / "sync").iterdir())
        assert len(now) == 1 and now != kept
        same(engine.generate(PROMPTS, SP), HFEngine(dense_dir, seed=0).generate(PROMPTS, SP), tol)
        assert all(sv.completed for sv in engine.servers)
    finally:
        engine.shutdown()
    assert list((tmp_path / "sync").iterdir()) == []
    assert all(p.poll() is not None for p in procs.procs)


def test_lone_server_hangs_then_dies_restarted_once_then_dropped(tol: float, dense_dir: Path, tmp_path: Path) -> None:
    """With every server down, ``generate`` waits for the restart; past ``max_restarts`` the server
    is dropped and the call fails with the failures named, in bounded time."""
    engine = launched(dense_dir, 1, tmp_path / "logs", request_timeout_s=3.0)
    engine.cfg.sglang.max_restarts = 1
    procs = engine.processes
    assert procs is not None
    try:
        os.killpg(procs.procs[0].pid, signal.SIGSTOP)  # hung: accepts connections, never answers
        same(engine.generate(PROMPTS[:4], SP), HFEngine(dense_dir, seed=0).generate(PROMPTS[:4], SP), tol)
        server = engine.servers[0]
        assert server.restarts == 1 and "Timeout" in engine.failures[0].error
        procs.kill(0)
        with pytest.raises(RolloutError, match=r"no rollout server of 1 can serve: .*Connection"):
            engine.generate(PROMPTS[:4], SP)
        assert server.retired and server.restarts == 1
    finally:
        engine.shutdown()
    assert procs.procs[0].poll() is not None


def test_distributed_sync_rebuilds_the_group_after_a_restart(
    tol: float, dense_dir: Path, dense_dir_b: Path, tmp_path: Path
) -> None:
    engine = launched(dense_dir, 2, tmp_path / "logs")
    engine.cfg.sglang.weight_sync = "distributed"
    engine.cfg.sglang.weight_sync_backend = "gloo"
    procs = engine.processes
    assert procs is not None
    try:
        engine.update_weights(HFCheckpointReader(dense_dir_b).items())
        first_group = engine._dist
        procs.kill(1)
        want_b = HFEngine(dense_dir_b, seed=0).generate(PROMPTS, SP)
        same(engine.generate(PROMPTS, SP), want_b, tol)
        engine.wait_for_restarts()
        victim = engine.servers[1]
        assert victim.up and victim.restarts == 1 and victim.stale  # base weights: not used for rollouts
        completed = victim.completed
        same(engine.generate(PROMPTS, SP), want_b, tol)
        assert victim.completed == completed

        engine.update_weights(HFCheckpointReader(dense_dir_b).items())  # a new group, both servers in it
        assert engine._dist is not first_group and not victim.stale
        same(engine.generate(PROMPTS, SP), want_b, tol)
        assert victim.completed > completed
    finally:
        engine.shutdown()


def test_shutdown_stops_servers_even_when_the_teardown_fails(dense_dir: Path, tmp_path: Path) -> None:
    engine = launched(dense_dir, 1, tmp_path / "logs")
    procs = engine.processes
    assert procs is not None

    def broken() -> None:
        raise KeyError("torch lost the group")

    engine.wait_for_restarts = broken  # type: ignore[method-assign]
    with pytest.raises(KeyError):
        engine.shutdown()
    assert procs.procs[0].poll() is not None and engine.processes is None
