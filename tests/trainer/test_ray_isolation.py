"""``opd train``'s Ray: without ``RAY_ADDRESS`` a private local cluster, whatever Ray state the node holds; with
``RAY_ADDRESS`` the cluster it names.

Where a plain ``ray.init()`` looks (ray 2.60, ``_private/services.py: get_ray_address_from_environment``):
``RAY_ADDRESS``, then the file ``ray_current_cluster`` in Ray's default temp dir (``$RAY_TMPDIR/ray``, else
``$TMPDIR/ray``, else ``/tmp/ray``), which every ``ray start`` writes and which outlives a head that was killed
rather than ``ray stop``-ped (a batch job's, say). A driver that then passes ``num_cpus`` fails with "When
connecting to an existing cluster, num_cpus and num_gpus must not be provided"; without it, it would join the
foreign cluster. The node is recreated here with ``RAY_TMPDIR`` pointing at a private directory, which is
the same lookup without touching this machine's ``/tmp/ray`` (other Ray users may rely on it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.launch.slurm_cluster import free_port

RAY = Path(sys.executable).with_name("ray")

# What ensure_ray connected to, as this script sees it from inside the driver.
DRIVER = """
import json, ray
from megatron_opd.trainer.worker_group import ensure_ray
ensure_ray(num_cpus=1)
node = ray._private.worker._global_node
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
                  "session": node.get_session_dir_path()}))
ray.shutdown()
"""


def port(address: str) -> str:
    """The port of a GCS address (Ray reports 127.0.0.1 as the node's own IP)."""
    return address.rsplit(":", 1)[1]


def run_driver(env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def node() -> Iterator[tuple[Path, dict[str, str]]]:
    """A private stand-in for the node's Ray defaults (``$RAY_TMPDIR/ray`` plays ``/tmp/ray``) and the
    environment of a driver there: no ``RAY_ADDRESS``, this checkout on the path, a Ray token of its own
    (whatever ``~/.ray/auth_token`` holds)."""
    root = Path(f"/tmp/opd-rt-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths must fit in 107 bytes
    (root / "ray").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(root), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex * 2}  # as the launchers do
    yield root, env
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def foreign(node: tuple[Path, dict[str, str]]) -> Iterator[str]:
    """A live Ray cluster beside the driver, started the way a user or a batch job does (``ray start --head``,
    its own temp dir); its GCS address. Stopped by ending its ``ray start --block`` (``ray stop`` would stop
    every Ray cluster of this user on the machine)."""
    root, env = node
    port = free_port()
    command = [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=false"]
    command += ["--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", f"--temp-dir={root / 'foreign'}"]
    command += [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    with open(root / "foreign.log", "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (root / "foreign" / "ray_current_cluster").is_file():  # written once the head is up
            assert proc.poll() is None and time.monotonic() < deadline, (root / "foreign.log").read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("named", ["a dead head", "the live foreign cluster"])
def test_without_ray_address_a_private_cluster(node: tuple[Path, dict[str, str]], foreign: str, named: str):
    """The node as a batch job leaves it: ``ray_current_cluster`` in the default temp dir names a head that is
    gone (or one still running), and another local cluster is alive. ``opd train`` starts its own."""
    root, env = node
    dead = f"127.0.0.1:{free_port()}"
    stale = dead if named == "a dead head" else foreign
    (root / "ray" / "ray_current_cluster").write_text(stale)
    got = run_driver(env)
    assert port(got["gcs"]) not in (port(dead), port(foreign)) and got["nodes"] == 1, got
    assert Path(got["session"]).parent == root / "ray", got  # its own session, not the foreign cluster's
    assert (root / "ray" / "ray_current_cluster").read_text() == stale  # left as it was


def test_with_ray_address_joins_that_cluster(node: tuple[Path, dict[str, str]], foreign: str):
    root, env = node
    got = run_driver({**env, "RAY_ADDRESS": foreign})
    assert port(got["gcs"]) == port(foreign) and got["nodes"] == 1, got
    assert Path(got["session"]).parent == root / "foreign", got
