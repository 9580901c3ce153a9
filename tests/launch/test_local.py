"""launch/local.sh with the CPU demo config: Ctrl-C during training checkpoints the step and stops cleanly, leaving
no process and no Ray file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.launch.conftest import REPO, ray_leftovers
from tests.launch.slurm_cluster import processes_with_env
from tests.launch.test_slurm import checkpoints, steps_logged


def test_interrupt_checkpoints_and_cleans_up(tmp_path: Path, job_env: dict[str, str], demo_config: Path):
    marker = uuid.uuid4().hex  # inherited by every process the script starts
    env = {**job_env, "OPD_TEST_MARKER": marker}
    del env["OPD_RAY_PORT"]  # local.sh picks a free port itself
    run = tmp_path / "run"
    with open(tmp_path / "local.out", "w") as out:
        proc = subprocess.Popen(
            [str(REPO / "launch" / "local.sh"), str(demo_config), f"run_dir={run}", "trainer.steps=20"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while not steps_logged(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None and steps_logged(run), (tmp_path / "local.out").read_text()[-4000:]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the script (Ray and opd train have their own sessions)
        rc = proc.wait(timeout=300)
    log = (tmp_path / "local.out").read_text()
    assert rc == 128 + signal.SIGINT, log[-4000:]
    assert checkpoints(run)[-1] == steps_logged(run)[-1] < 20, log[-4000:]
    deadline = time.monotonic() + 30
    while (left := processes_with_env("OPD_TEST_MARKER", marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"local.sh left processes behind: {left}"
    left = ray_leftovers(env)
    assert not left, f"local.sh left Ray behind: {left}"
