"""Fixtures of the launcher tests: a real Slurm cluster on localhost and the environment a job needs."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import (
    SlurmCluster,
    SlurmUnavailable,
    ensure_packages,
    free_port,
    processes_with_cmdline,
)

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo" / "cpu.yaml"
NODES = ["n1", "n2"]  # emulated nodes: a 2-node job has a Ray head and a Ray worker (or a rollout node)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """munged + slurmctld + one slurmd per node, stopped at the end with nothing left behind."""
    try:
        ensure_packages()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    # not under pytest's 0700 base directory: munged wants every directory above its socket reachable by all
    root = Path(tempfile.mkdtemp(prefix="opd-slurm-"))
    cluster = SlurmCluster(root, NODES)
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
    assert not left, "processes left behind by the Slurm test cluster or its jobs:\n" + "\n".join(left)
    shutil.rmtree(root)


@pytest.fixture
def job_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """OPD_* knobs for a test job: this interpreter's environment, ports, and a directory of its own standing for
    the node's /tmp as Ray sees it (other Ray clusters may run on this machine at the same time): the scripts' Ray
    directories go there (``OPD_RAY_TMPDIR``) and so would Ray's default ``ray/`` (``RAY_TMPDIR``)."""
    venv = Path(sys.prefix)
    ray_root = Path(f"/tmp/opd-rt-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths must fit 107 bytes
    ray_root.mkdir()
    env = {
        "OPD_VENV": str(venv) if (venv / "bin" / "activate").is_file() else "",
        "OPD_RAY_PORT": str(free_port()),
        "OPD_RAY_CLIENT_PORT": str(free_port()),
        "OPD_RAY_AGENT_PORT": str(free_port()),
        "OPD_RAY_TMPDIR": str(ray_root),
        "RAY_TMPDIR": str(ray_root),
        "OPD_LOG_DIR": str(tmp_path / "logs"),
        "OMP_NUM_THREADS": "1",  # two cores shared by every process of the job
    }
    yield env
    shutil.rmtree(ray_root, ignore_errors=True)


def ray_leftovers(env: dict[str, str], timeout_s: float = 30.0) -> list[str]:
    """What a finished job's Ray left on the node: files in its stand-in for /tmp (``job_env``) and live processes
    whose command line names a path there; waits up to ``timeout_s`` for them to go."""
    root = env["RAY_TMPDIR"]
    deadline = time.monotonic() + timeout_s
    while True:
        left = [str(p) for p in sorted(Path(root).iterdir())]
        left += [f"pid {pid}: {cmd}" for pid, cmd in processes_with_cmdline(root)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture
def demo_config(demo_assets: object) -> Path:
    """The CPU demo config, its assets already built (so jobs do not race to build them)."""
    return DEMO_CONFIG
