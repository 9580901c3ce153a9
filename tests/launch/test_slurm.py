"""launch/slurm/opd.sbatch on a real Slurm (slurmctld + slurmd on localhost) with the CPU demo config.

- a 2-node job: Ray head + Ray worker joined, opd train runs to the end, checkpoint + metrics, nothing left;
- a 2-node job with OPD_ROLLOUT_NODES=1: rollout servers (`opd serve`) on the last node, the trainer attached;
- stop and resume: the time-limit path (USR1 to the batch shell: checkpoint, requeue, the requeued job resumes),
  a plain `scancel` (everything killed, nothing left), and a resubmission that resumes and completes;
- a layout the allocation cannot hold fails before anything starts.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from megatron_opd.trainer.checkpoint import CheckpointManager
from tests.launch.conftest import REPO
from tests.launch.slurm_cluster import SlurmCluster

SBATCH = REPO / "launch" / "slurm" / "opd.sbatch"


def submit(
    slurm: SlurmCluster,
    tmp_path: Path,
    env: dict[str, str],
    config: Path,
    *overrides: str,
    nodes: int = 1,
) -> int:
    """sbatch from the repository root, as a user would; GPUs off (the #SBATCH line asks for 8)."""
    return slurm.sbatch(
        f"--nodes={nodes}",
        "--gpus-per-node=0",
        f"--output={tmp_path}/slurm-%j.out",
        str(SBATCH),
        str(config.relative_to(REPO)),
        f"run_dir={tmp_path / 'run'}",
        *overrides,
        cwd=REPO,
        env=env,
    )


def output(tmp_path: Path, job_id: int) -> str:
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def checkpoints(run_dir: Path) -> list[int]:
    return CheckpointManager(run_dir / "checkpoints", keep_last=0).complete_steps()


def wait_for(
    what: str, ready: Callable[[], object], timeout_s: float, slurm: SlurmCluster, job_id: int, tmp_path: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        state = slurm.job(job_id).get("JobState")
        if time.monotonic() > deadline or state in {"FAILED", "CANCELLED", "COMPLETED", "TIMEOUT", "NODE_FAIL"}:
            raise AssertionError(f"no {what} (job {job_id}: {state}):\n{output(tmp_path, job_id)[-4000:]}")
        time.sleep(1.0)


def assert_clean(slurm: SlurmCluster, job_id: int) -> None:
    left = slurm.wait_gone(job_id, timeout_s=60)
    assert not left, f"job {job_id} left processes behind: {left}"


def test_two_node_job_completes(slurm: SlurmCluster, tmp_path: Path, job_env: dict[str, str], demo_config: Path):
    job = submit(slurm, tmp_path, job_env, demo_config, "trainer.steps=3", nodes=2)
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=300)
    log = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "wait-ray: 2 Ray node(s) alive" in log, log[-4000:]
    run = tmp_path / "run"
    assert steps_logged(run) == [1, 2, 3]
    assert checkpoints(run)[-1] == 3
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert (Path(job_env["OPD_LOG_DIR"]) / "ray-worker-n2.log").is_file()
    assert_clean(slurm, job)


def test_rollout_nodes(slurm: SlurmCluster, tmp_path: Path, job_env: dict[str, str], demo_config: Path):
    env = {**job_env, "OPD_ROLLOUT_NODES": "1", "OPD_ROLLOUT_SERVER": "opd"}
    job = submit(slurm, tmp_path, env, demo_config, "trainer.steps=2", nodes=2)
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=300)
    log = output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "wait-ray: 1 Ray node(s) alive" in log and "rollout servers: http://127.0.0.1:" in log, log[-4000:]
    urls = (Path(job_env["OPD_LOG_DIR"]) / "rollout" / "n2.urls").read_text().split()
    rollout = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["rollout"]
    assert rollout["engine"] == "sglang" and rollout["sglang"]["urls"] == urls
    assert steps_logged(tmp_path / "run") == [1, 2]
    assert_clean(slurm, job)


def test_stop_requeue_cancel_resume(slurm: SlurmCluster, tmp_path: Path, job_env: dict[str, str], demo_config: Path):
    run = tmp_path / "run"
    args = ("trainer.steps=6", "trainer.save_every=1")
    job = submit(slurm, tmp_path, job_env, demo_config, *args)

    # the time limit's warning: USR1 to the batch shell only (what --signal=B:USR1@300 does)
    wait_for("first step", lambda: steps_logged(run), 300, slurm, job, tmp_path)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm.env(), check=True)
    wait_for("requeue", lambda: slurm.job(job).get("Restarts") == "1", 120, slurm, job, tmp_path)
    first = steps_logged(run)
    assert checkpoints(run)[-1] == first[-1], "the stop must checkpoint the last finished step"
    assert "opd train exited with code 138" in output(tmp_path, job)

    # the requeued attempt resumes at the next step
    wait_for("a resumed step", lambda: len(steps_logged(run)) > len(first), 300, slurm, job, tmp_path)
    assert steps_logged(run)[len(first)] == first[-1] + 1

    # plain scancel: Slurm signals every process; the job ends and nothing survives
    subprocess.run(["scancel", str(job)], env=slurm.env(), check=True)
    info = slurm.wait_job(job, {"CANCELLED"}, timeout_s=120)
    assert info["Restarts"] == "1"
    assert_clean(slurm, job)

    # a resubmission continues after the last complete checkpoint and finishes
    last = checkpoints(run)[-1]
    before = len(steps_logged(run))
    again = submit(slurm, tmp_path, job_env, demo_config, *args)
    info = slurm.wait_job(again, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=300)
    assert info["JobState"] == "COMPLETED", output(tmp_path, again)[-4000:]
    resumed = steps_logged(run)[before:]
    assert resumed == list(range(last + 1, 7)), resumed
    assert checkpoints(run)[-1] == 6
    assert_clean(slurm, again)


def test_layout_the_allocation_cannot_hold(slurm: SlurmCluster, tmp_path: Path, job_env: dict[str, str]):
    env = {**job_env, "OPD_ROLLOUT_NODES": "1"}
    job = submit(slurm, tmp_path, env, REPO / "configs" / "paper" / "exopd_qwen3_1p7b_from_30b_a3b.yaml", nodes=1)
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=60)
    assert info["JobState"] == "FAILED"
    assert "OPD_ROLLOUT_NODES=1 leaves no node for training in a 1-node job" in output(tmp_path, job)
    assert_clean(slurm, job)
