"""A real Slurm cluster on localhost for the launcher tests: munged, slurmctld and one slurmd per emulated node.

Every node is this machine (``NodeAddr=127.0.0.1``, its own slurmd port and spool directory), so a multi-node
job runs its srun steps, its Ray head and its Ray workers here, through the same code paths as on a cluster.
State, spool, sockets, logs and the munge key live in one temporary directory; nothing under /etc is used.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

# binary -> the Debian package that ships it
BINARIES = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "scontrol": "slurm-client",
}
# requeued jobs wait cred_expire + 1 s before they start again (Slurm's default 120 s is too long for a test)
CRED_EXPIRE_S = 10


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (missing packages and not root); the message says what to do."""


def ensure_packages() -> None:
    """Install slurm-wlm and munge with apt when a binary is missing (root only)."""
    missing = sorted({pkg for binary, pkg in BINARIES.items() if shutil.which(binary) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm is not installed (missing {', '.join(missing)}) and installing it needs root: "
            "run `apt-get install -y slurm-wlm munge` or run the tests as root."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or a kernel thread
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes_with_env(key: str, value: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment has ``key=value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            # zombies keep their environ until reaped; they run nothing
            if process_environ(int(entry.name)).get(key) == value and not is_zombie(int(entry.name)):
                found.append((int(entry.name), process_cmdline(int(entry.name))))
    return found


def processes_with_cmdline(fragment: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process (zombies aside) whose command line contains ``fragment``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and not is_zombie(int(entry.name)):
            cmd = process_cmdline(int(entry.name))
            if fragment in cmd:
                found.append((int(entry.name), cmd))
    return found


def is_zombie(pid: int) -> bool:
    """Exited and not yet reaped (it runs nothing); a process that is gone counts too."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except OSError:
        return True


@dataclasses.dataclass
class SlurmCluster:
    root: Path
    nodes: list[str]
    name: str = dataclasses.field(default_factory=lambda: "opdtest" + uuid.uuid4().hex[:8])
    daemons: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for Slurm commands (and, through sbatch, for the jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> SlurmCluster:
        for sub in ("etc", "state", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged refuses a socket in a directory others cannot reach
        (self.root / "run").chmod(0o755)
        (self.root / "etc").chmod(0o700)
        key = self.root / "etc" / "munge.key"
        key.write_bytes(os.urandom(1024))  # what mungekey --create writes, without needing it
        key.chmod(0o400)
        socket_path = self.root / "run" / "munge.socket"
        munged = ["munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}"]
        munged += [f"--pid-file={self.root / 'run' / 'munged.pid'}", f"--seed-file={self.root / 'etc' / 'seed'}"]
        self._spawn("munged", [*munged, f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: socket_path.exists(), "munged's socket", "munged")
        self._write_conf(socket_path)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: "UP" in self._try("scontrol", "ping"), "slurmctld to answer", "slurmctld")
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._all_idle, "every node idle", "slurmd-" + self.nodes[-1])
        return self

    def stop(self) -> list[str]:
        """Cancel the jobs still there (a failed test leaves its job running) and stop the daemons (slurmds first);
        returns what was left behind (empty when clean)."""
        left = []
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            jobs = self._try("squeue", "--noheader", "--format=%i").split()
            if jobs:
                self._try("scancel", *jobs)
                left += [f"job {job} still running at the end: cancelled" for job in jobs]
                self.wait_gone(timeout_s=60)
        for name in sorted(self.daemons, key=lambda n: ("slurmd" not in n, n != "munged")):
            proc = self.daemons[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    left.append(f"{name} ignored SIGTERM for 30 s")
        for pid, cmd in processes_with_env("OPD_TEST_SLURM", str(self.root)) + self.job_processes():
            left.append(f"pid {pid}: {cmd}")
        return left

    def _spawn(self, name: str, command: list[str]) -> None:
        env = self.env(OPD_TEST_SLURM=str(self.root))  # marks the daemons and their slurmstepds
        with open(self.root / "log" / f"{name}.out", "ab") as log:
            self.daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def _wait(self, ready: Callable[[], bool], what: str, daemon: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.daemons[daemon].poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(
                    f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("log/*"))
                )
                raise RuntimeError(f"Slurm test cluster: no {what} after {timeout_s:.0f} s\n{logs}")
            time.sleep(0.3)

    def _write_conf(self, munge_socket: Path) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = len(os.sched_getaffinity(0))  # never more than slurmd detects (a node with fewer is drained)
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd-%n.log'}",
            # no cgroups: processes are tracked through the process tree, tasks are not bound
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",  # seconds between SIGTERM and SIGKILL when a job is cancelled (Slurm's default: 30)
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` for the whole session
            "SchedulerParameters=sched_interval=2",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} "
                "RealMemory=1024 State=UNKNOWN"
            )
        lines.append("PartitionName=opd Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _try(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env(), capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else ""

    def _all_idle(self) -> bool:
        states = self._try("sinfo", "--noheader", "--Node", "--format=%N %T").split()
        return states[1::2] == ["idle"] * len(self.nodes)

    # ------------------------------------------------------------ jobs

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        out = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env=self.env(**(env or {})), capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self._try("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: int, states: set[str], timeout_s: float) -> dict[str, str]:
        """Wait until the job's state is one of ``states``; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: {info}")
            time.sleep(1.0)

    def wait_gone(self, job_id: int | None = None, timeout_s: float = 60.0) -> list[tuple[int, str]]:
        """Wait until no process of the job (or of any job) is alive; returns the survivors after the timeout."""
        deadline = time.monotonic() + timeout_s
        while (left := self.job_processes(job_id)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def job_processes(self, job_id: int | None = None) -> list[tuple[int, str]]:
        """Live processes started by a job of this cluster (by the job environment Slurm sets)."""
        procs = processes_with_env("SLURM_CLUSTER_NAME", self.name)
        if job_id is not None:
            procs = [(pid, cmd) for pid, cmd in procs if process_environ(pid).get("SLURM_JOB_ID") == str(job_id)]
        return procs
