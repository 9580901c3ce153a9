"""One run directory through a chain of faults, each followed by ``resume: auto`` (OPD_FAULT points,
``megatron_opd/trainer/faults.py``). Student TP=2 (a collective to hang in), dense teacher, 3 steps,
a checkpoint every step; the checkpoints directory is a 32 MiB tmpfs when this process may mount one.

1. ``k1``: a fresh run (its own local Ray) whose driver is SIGKILLed while checkpoint 3 is being
   written. Its steps 1-3 are the uninterrupted reference (metrics are logged before the save).
2. A copy of checkpoint 2 without its marker is planted as ``iter_0000003``.
3. ``kills``: drivers joined to this process's Ray cluster, SIGKILLed during the rollout, the scoring
   and after the optimizer step of step 3; each resumes from checkpoint 2.
4. ``rank_death``: student rank 1 is SIGKILLed before the train step (rank 0 enters a collective);
   ``rank_hang``: it is SIGSTOPped instead (a hung rank), with ``trainer.group_timeout_s=15``.
5. ``disk_full``: the tmpfs is filled; step 3 runs (its loss must equal the reference) and its
   checkpoint cannot be written.
6. ``final``: resumes once more with rollouts from SGLang-API servers (one hangs, one is gone,
   one works) and finishes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_opd.config.errors import ConfigError
from megatron_opd.rollout.sglang.launcher import ServerCommand, ServerProcesses, find_free_ports
from megatron_opd.trainer.checkpoint import MARKER, CheckpointManager
from tests.reliability.conftest import (
    RunResult,
    model_workers,
    opd_in_process,
    opd_subprocess,
    still_alive,
    tagged,
    tripwire,
)
from tests.tolerance import FORWARD_ULPS, metric_atol

pytestmark = pytest.mark.slow
KEYS = ("train/loss", "train/grad_norm", "teacher/reverse_kl", "rollout/response_len")
TMPFS_BYTES = 32 << 20
HANG_TIMEOUT_S = 15


@pytest.fixture(scope="module")
def run_dir(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The chain's run directory, its checkpoints/ a tmpfs where this process may mount one."""
    out = tmp_path_factory.mktemp("chain") / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    if os.geteuid() == 0 and shutil.which("mount"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(ckpts)], check=False)
    yield out
    if os.path.ismount(ckpts):
        subprocess.run(["umount", "-l", str(ckpts)], check=True)


def ckpts(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(run_dir / "checkpoints", keep_last=5)


def same_step(got: dict, want: dict, ulps: float = 8) -> None:
    """The metrics agree to ``ulps`` fp32 ulps; by default 8: the same computation from restored state."""
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], rel=0, abs=metric_atol(want[key], ulps)), key


# ---------------------------------------------------------------- rollout servers for the last stage


class _StuckServer(BaseHTTPRequestHandler):
    """Healthy, takes weight updates, never finishes a /generate (until released at teardown)."""

    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(b"{}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/generate":
            self.release.wait(120)
            return
        self._answer(b'{"success": true, "message": ""}')


@pytest.fixture(scope="module")
def servers(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """``stuck``, ``gone`` (nothing listens) and ``live`` (``opd serve`` of the student, started in
    the background while the first stages run: ``live`` is a Future of its URL)."""
    stuck = ThreadingHTTPServer(("127.0.0.1", 0), _StuckServer)
    stuck.daemon_threads = True
    threading.Thread(target=stuck.serve_forever, daemon=True).start()
    port, gone = find_free_ports("127.0.0.1", 20000, 2)
    cmd = [sys.executable, "-m", "megatron_opd", "serve", "--model", str(assets / "student"), "--batch-size", "4"]
    cmd.append("--enable-deterministic-inference")  # honour the row seeds, as SGLang does only with it
    procs = ServerProcesses(
        [ServerCommand(f"http://127.0.0.1:{port}", [*cmd, "--port", str(port)], {"OMP_NUM_THREADS": "1"}, "live")],
        tmp_path_factory.mktemp("server_logs"),
    )
    pool = ThreadPoolExecutor(1)
    live: Future = pool.submit(lambda: procs.start(timeout_s=300).urls[0])
    yield {"stuck": f"http://127.0.0.1:{stuck.server_address[1]}", "gone": f"http://127.0.0.1:{gone}", "live": live}
    _StuckServer.release.set()
    stuck.shutdown()
    stuck.server_close()
    with contextlib.suppress(Exception):
        live.result(timeout=300)
    procs.stop()
    pool.shutdown()


# ---------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def k1(assets: Path, run_dir: Path, servers: dict) -> RunResult:
    return opd_subprocess(assets / "config.yaml", run_dir, env={"OPD_FAULT": "checkpoint@3"}, tag="k1")


@pytest.fixture(scope="module")
def kills(assets: Path, run_dir: Path, k1: RunResult, ray_address: str) -> dict[str, tuple[RunResult, list[str]]]:
    """Per phase: the killed run and the ModelWorker actors still alive 60 s after the kill."""
    planted = run_dir / "checkpoints" / "iter_0000003"
    shutil.copytree(run_dir / "checkpoints" / "iter_0000002", planted)
    (planted / MARKER).unlink()
    out = {}
    for phase in ("rollout", "score", "train"):
        env = {"OPD_FAULT": f"{phase}@3", "RAY_ADDRESS": ray_address}
        result = opd_subprocess(assets / "config.yaml", run_dir, env=env, tag=f"kill_{phase}")
        out[phase] = (result, still_alive(model_workers(), 60))
    return out


@pytest.fixture(scope="module")
def rank_death(assets: Path, run_dir: Path, kills: dict) -> tuple[RunResult, list[str]]:
    result = opd_in_process(assets / "config.yaml", run_dir, env={"OPD_FAULT": "score@3:student:1"})
    return result, still_alive(model_workers(), 30)


@pytest.fixture(scope="module")
def rank_hang(assets: Path, run_dir: Path, rank_death: tuple) -> tuple[RunResult, list[str]]:
    env = {"OPD_FAULT": "score@3:student:1:SIGSTOP"}
    result = opd_in_process(assets / "config.yaml", run_dir, f"trainer.group_timeout_s={HANG_TIMEOUT_S}", env=env)
    return result, still_alive(model_workers(), 30)


@pytest.fixture(scope="module")
def disk_full(assets: Path, run_dir: Path, rank_hang: tuple) -> tuple[RunResult, list[Path]] | None:
    """The run on a full disk, and the temporary checkpoint directories it left."""
    if not os.path.ismount(run_dir / "checkpoints"):
        return None
    root = run_dir / "checkpoints"
    # k1's partial checkpoint waits outside (the save would delete it and use its space), then comes
    # back for the final stage to clear away.
    (partial,) = root.glob("iter_*.tmp-*")
    parked = shutil.move(partial, run_dir.parent / partial.name)
    ballast = root / "ballast"
    with open(ballast, "wb") as f:  # leave 256 KiB; a checkpoint takes more than 1 MiB
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(root).free - (256 << 10))
    try:
        return opd_in_process(assets / "config.yaml", run_dir), list(root.glob("iter_*.tmp-*"))
    finally:
        ballast.unlink()
        shutil.move(parked, partial)


@pytest.fixture(scope="module")
def final(assets: Path, run_dir: Path, disk_full: tuple | None, servers: dict) -> RunResult:
    urls = [servers["stuck"], servers["gone"], servers["live"].result(timeout=300)]
    return opd_in_process(
        assets / "config.yaml",
        run_dir,
        "rollout.engine=sglang",
        f"rollout.sglang.urls=[{','.join(urls)}]",
        "rollout.request_timeout_s=8",
        "rollout.retry_backoff_s=0.1",
    )


# ---------------------------------------------------------------- tests, in chain order


@pytest.mark.fault("driver SIGKILL while writing a checkpoint", "no half-written checkpoint; the last one intact")
def test_driver_killed_during_checkpoint_write(k1: RunResult, run_dir: Path) -> None:
    assert k1.rc == -9 and "fault injection (OPD_FAULT=checkpoint@3)" in k1.output, k1.output[-3000:]
    assert sorted(k1.metrics) == [1, 2, 3]
    root = run_dir / "checkpoints"
    assert ckpts(run_dir).complete_steps() == [1, 2]
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "2"
    (partial,) = root.glob("iter_0000003.tmp-*")  # the shards were being written: not a checkpoint
    assert any(partial.glob("*.distcp")) and not (partial / MARKER).exists()
    assert all((d / MARKER).is_file() for d in root.glob("iter_???????"))
    assert still_alive(tagged("k1", "ModelWorker"), 60) == []


@pytest.mark.fault("resume=PATH of a checkpoint of another model", "clear error before any worker starts")
def test_checkpoint_of_another_model_is_refused(
    k1: RunResult, run_dir: Path, assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron_opd.config.loader import load_config
    from megatron_opd.trainer import driver

    monkeypatch.setattr(driver, "ensure_ray", tripwire)
    ckpt = run_dir / "checkpoints" / "iter_0000002"
    overrides = [f"run_dir={tmp_path}", f"student.path={assets / 'student_other'}", f"resume={ckpt}"]
    with pytest.raises(ConfigError) as info:
        driver.run_training(load_config(assets / "config.yaml", overrides))
    assert (
        f"resume={str(ckpt)!r}: {ckpt} is a checkpoint of another model than student.path (hidden_size 64 vs 32)"
        in (str(info.value))
    )


@pytest.mark.fault("checkpoint directory without its completion marker", "ignored with a warning")
def test_checkpoint_without_marker_is_ignored(kills: dict, run_dir: Path) -> None:
    first, _ = kills["rollout"]
    planted = run_dir / "checkpoints" / "iter_0000003"
    assert f"ignoring incomplete checkpoint {planted} (no {MARKER} marker)" in first.output, first.output[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'iter_0000002'}" in first.output


@pytest.mark.parametrize("phase", ["rollout", "score", "train"])
@pytest.mark.fault("driver SIGKILL during rollout / scoring / after the optimizer step", "resume from the last one")
def test_driver_killed_mid_step(kills: dict, run_dir: Path, phase: str) -> None:
    result, actors_left = kills[phase]
    assert result.rc == -9 and f"fault injection (OPD_FAULT={phase}@3)" in result.output, result.output[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'iter_0000002'}" in result.output
    assert result.metrics == {}  # killed before step 3 was logged
    assert ckpts(run_dir).complete_steps() == [1, 2]
    assert actors_left == []  # the cluster reaps the actors of a dead driver


@pytest.mark.fault("student rank SIGKILL (its peer waits in a collective)", "error naming group and rank, promptly")
def test_worker_rank_death_stops_the_run(rank_death: tuple, run_dir: Path) -> None:
    result, actors_left = rank_death
    assert result.error is not None, result.output[-3000:]
    assert "group 'student': rank 1 died during train_step" in str(result.error)
    injected = result.record_time("fault injection (OPD_FAULT=score@3:student:1)")
    assert result.error_time - injected < 30  # not trainer.group_timeout_s (120 s)
    assert actors_left == []  # the surviving rank, stuck in its collective, was killed too
    assert ckpts(run_dir).complete_steps() == [1, 2]


@pytest.mark.fault(
    "student rank hung (SIGSTOP) in a collective", "error naming the group after trainer.group_timeout_s"
)
def test_hung_rank_stops_the_run_after_the_group_timeout(rank_hang: tuple, run_dir: Path) -> None:
    result, actors_left = rank_hang
    assert result.error is not None, result.output[-3000:]
    message = str(result.error)
    assert f"group 'student': train_step did not finish within {HANG_TIMEOUT_S}s" in message or (
        "group 'student': rank 0 raised in train_step" in message and "imed out" in message  # gloo's own timeout
    ), message
    waited = result.error_time - result.record_time("fault injection (OPD_FAULT=score@3:student:1:SIGSTOP)")
    assert HANG_TIMEOUT_S <= waited < HANG_TIMEOUT_S + 30
    assert actors_left == []  # the stopped rank too
    assert ckpts(run_dir).complete_steps() == [1, 2]


@pytest.mark.fault("disk full while saving a checkpoint", "previous checkpoint survives; clear error")
def test_disk_full_keeps_the_previous_checkpoint(disk_full: tuple | None, run_dir: Path) -> None:
    if disk_full is None:
        pytest.skip("no tmpfs: mounting needs root")
    result, temporaries = disk_full
    assert result.error is not None, result.output[-3000:]
    message = str(result.error)
    assert message.startswith("step 3: the checkpoint could not be written") and "the disk is full" in message, message
    assert f"the last complete checkpoint, {run_dir / 'checkpoints' / 'iter_0000002'}, is intact" in message
    assert ckpts(run_dir).complete_steps() == [1, 2]
    assert temporaries == []  # the partial save was removed


@pytest.mark.fault("driver SIGKILL, then resume: auto", "the next step's loss equals the uninterrupted run's")
def test_resumed_step_equals_the_uninterrupted_run(disk_full: tuple | None, k1: RunResult) -> None:
    if disk_full is None:
        pytest.skip("no tmpfs: the resumed step is checked by the final stage")
    result, _ = disk_full
    assert sorted(result.metrics) == [3]
    same_step(result.metrics[3], k1.metrics[3])


@pytest.mark.fault("rollout server hanging / gone mid-run", "requests move to a healthy server; reported")
def test_final_resume_through_failing_rollout_servers(
    final: RunResult, k1: RunResult, run_dir: Path, servers: dict
) -> None:
    assert final.error is None, f"{final.error}\n{final.output[-3000:]}"
    assert final.summary is not None and final.summary["steps"] == 3
    assert sorted(final.metrics) == [3]
    same_step(final.metrics[3], k1.metrics[3], ulps=2 * FORWARD_ULPS)  # served rollouts: as test_e2e's
    assert f"rollout server {servers['stuck']} failed (ReadTimeout" in final.output
    assert f"rollout server {servers['gone']} is down during weight update" in final.output
    assert ckpts(run_dir).complete_steps() == [1, 2, 3]
    root = run_dir / "checkpoints"
    assert not list(root.glob("iter_*.tmp-*")) and all((d / MARKER).is_file() for d in root.glob("iter_???????"))


@pytest.mark.fault("driver SIGKILL with its own local Ray", "no process of its Ray cluster lingers")
def test_killed_drivers_leave_no_processes(final: RunResult) -> None:
    assert still_alive(tagged("k1"), 150) == []
    assert not any(tagged(f"kill_{phase}") for phase in ("rollout", "score", "train"))
