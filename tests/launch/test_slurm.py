"""launch/slurm/opd.sbatch on a real Slurm (slurmctld + slurmd on localhost) with the CPU demo config.

- one run through the life of a job: a 2-node start (Ray worker joined), the time limit's USR1 (checkpoint,
  requeue, the requeued attempt resumes), a plain `scancel` (everything ends, nothing left), a resubmission
  with the rollouts served from the second node (`opd serve`, the trainer attached to its URL) that resumes
  and completes with checkpoint, metrics and summary; after every attempt the node holds no Ray process, Ray
  directory or ``ray_current_cluster`` of the job;
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
from tests.launch.conftest import REPO, ray_leftovers
from tests.launch.slurm_cluster import SlurmCluster, processes_with_cmdline

SBATCH = REPO / "launch" / "slurm" / "opd.sbatch"
STEPS = 12  # enough that every stop lands before the end


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


def assert_clean(slurm: SlurmCluster, job_id: int, env: dict[str, str]) -> None:
    """The node as the job found it: no process of the job, no Ray process or file of it (Ray directories, Ray's
    default ``ray/`` with its ``ray_current_cluster``)."""
    left = slurm.wait_gone(job_id, timeout_s=60)
    assert not left, f"job {job_id} left processes behind: {left}"
    left = ray_leftovers(env)
    assert not left, f"job {job_id} left Ray behind: {left}"


def ray_dirs(env: dict[str, str]) -> list[str]:
    """The Ray directories of running jobs (launch/common.sh opd_ray_dir: opd-ray-JOB-ATTEMPT.STEP)."""
    return sorted(p.name for p in Path(env["OPD_RAY_TMPDIR"]).glob("opd-ray-*"))


def test_stop_requeue_cancel_resume_complete(
    slurm: SlurmCluster, tmp_path: Path, job_env: dict[str, str], demo_config: Path
):
    """One run through every way a job starts and ends (each attempt costs a full trainer start-up)."""
    run, logs = tmp_path / "run", Path(job_env["OPD_LOG_DIR"])
    args = (f"trainer.steps={STEPS}", "trainer.save_every=1")

    # attempt 0, two nodes: the Ray worker joins the head
    job = submit(slurm, tmp_path, job_env, demo_config, *args, nodes=2)
    wait_for("a first step", lambda: steps_logged(run), 300, slurm, job, tmp_path)
    assert "wait-ray: 2 Ray node(s) alive" in output(tmp_path, job)
    assert (logs / "ray-worker-n2.log").is_file()
    # each Ray node in a directory of the job's own (steps 0 and 1 of attempt 0: the head, the worker)
    assert ray_dirs(job_env) == [f"opd-ray-{job}-0.0", f"opd-ray-{job}-0.1"]
    assert not (Path(job_env["RAY_TMPDIR"]) / "ray").exists()

    # the time limit's warning is USR1 to the batch shell only (--signal=B:USR1@300): checkpoint, then requeue
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm.env(), check=True)
    wait_for("a requeue", lambda: slurm.job(job).get("Restarts") == "1", 180, slurm, job, tmp_path)
    first = steps_logged(run)
    assert "opd train exited with code 138" in output(tmp_path, job), output(tmp_path, job)[-4000:]
    assert checkpoints(run)[-1] == first[-1] < STEPS, "the stop must checkpoint the last finished step"

    # attempt 1 (Slurm starts it again): resumes at the next step; attempt 0's Ray is gone, processes and files
    wait_for("a resumed step", lambda: len(steps_logged(run)) > len(first), 300, slurm, job, tmp_path)
    assert steps_logged(run)[len(first)] == first[-1] + 1
    assert ray_dirs(job_env) == [f"opd-ray-{job}-1.0", f"opd-ray-{job}-1.1"]
    assert not processes_with_cmdline(f"opd-ray-{job}-0.")

    # a plain scancel: Slurm signals every process of the job at once; it ends and nothing survives
    subprocess.run(["scancel", str(job)], env=slurm.env(), check=True)
    info = slurm.wait_job(job, {"CANCELLED"}, timeout_s=120)
    assert info["Restarts"] == "1"
    assert_clean(slurm, job, job_env)

    # a resubmission, with the rollouts served from the second node: resumes after the last complete
    # checkpoint and runs to the end
    last = checkpoints(run)[-1]
    env = {**job_env, "OPD_ROLLOUT_NODES": "1", "OPD_ROLLOUT_SERVER": "opd"}
    again = submit(slurm, tmp_path, env, demo_config, *args, nodes=2)
    info = slurm.wait_job(again, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=300)
    log = output(tmp_path, again)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "wait-ray: 1 Ray node(s) alive" in log and "rollout servers: http://127.0.0.1:" in log, log[-4000:]
    urls = (logs / "rollout" / "n2.urls").read_text().split()
    rollout = yaml.safe_load((run / "config.yaml").read_text())["rollout"]
    assert rollout["engine"] == "sglang" and rollout["sglang"]["urls"] == urls
    # metrics.jsonl was cut back to the checkpoint on resume: every step exactly once, in order
    assert steps_logged(run) == list(range(1, STEPS + 1)) and last < STEPS
    assert f"resuming from {run / 'checkpoints' / f'iter_{last:07d}'}" in log, log[-4000:]
    assert checkpoints(run)[-1] == STEPS
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    assert_clean(slurm, again, job_env)


def test_layout_the_allocation_cannot_hold(slurm: SlurmCluster, tmp_path: Path, job_env: dict[str, str]):
    env = {**job_env, "OPD_ROLLOUT_NODES": "1"}
    job = submit(slurm, tmp_path, env, REPO / "configs" / "paper" / "exopd_qwen3_1p7b_from_30b_a3b.yaml", nodes=1)
    info = slurm.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=60)
    assert info["JobState"] == "FAILED"
    assert "OPD_ROLLOUT_NODES=1 leaves no node for training in a 1-node job" in output(tmp_path, job)
    assert_clean(slurm, job, env)
