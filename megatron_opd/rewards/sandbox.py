"""Run an untrusted Python program in a confined subprocess (the parent side; see ``sandbox_child``).

Every run gets a fresh temporary directory: the program is written there as ``solution.py`` and runs
with a ``work/`` subdirectory as cwd, HOME and TMPDIR, a minimal environment, ``python -I -S`` (no
user site, no ``PYTHON*`` variables, no ``.pth`` hooks; the interpreter's site-packages stay
importable), its own session and process group, stdout and stderr to files outside ``work/``.
On the wall-clock limit the whole process group is killed with SIGKILL, children included; after a
normal exit the group is killed too, so nothing the program left running survives it. The limits
and the network isolation are set inside the child, before the program starts (``sandbox_child``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import signal
import site
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_STDERR_KEEP = 4000  # characters of stderr kept (the end, where the traceback is)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run. ``timeout_s`` bounds one test: a stdin/stdout run of the whole
    program, or one function call; ``total_timeout_s`` bounds a process that makes many calls."""

    timeout_s: float = 6.0
    total_timeout_s: float = 60.0
    memory_mb: int = 2048
    max_output_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("timeout_s", "total_timeout_s", "memory_mb", "max_output_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name}={getattr(self, name)!r}: must be > 0.")


@dataclasses.dataclass
class SandboxRun:
    """How a run ended. ``status``: ``ok`` (exit 0), ``error`` (non-zero exit or killed by a signal),
    ``timeout`` (wall-clock or CPU limit), ``memory`` (MemoryError under the address-space limit),
    ``output_limit`` (a file, stdout included, grew past ``max_output_mb``). ``calls``: in call
    mode, one ``{"value": ...}`` / ``{"error": ...}`` per call made (see ``sandbox_child``)."""

    status: str
    returncode: int
    stdout: str
    stderr: str
    calls: list[dict] = dataclasses.field(default_factory=list)


def run_script(source: str, stdin: str, limits: SandboxLimits) -> SandboxRun:
    """Run ``source`` as ``__main__`` with ``stdin`` as its standard input, within ``limits.timeout_s``."""
    return _run({"mode": "script"}, source, stdin, limits.timeout_s, limits)


def run_calls(source: str, fn_name: str, inputs: list[list], limits: SandboxLimits) -> SandboxRun:
    """Run ``source`` (not as ``__main__``), then call ``fn_name(*args)`` for each ``args`` in ``inputs``
    (a module-level function or a method of ``class Solution``), each call within ``limits.timeout_s``,
    stopping at the first that raises; the process within ``limits.total_timeout_s``."""
    job = {"mode": "call", "fn_name": fn_name, "inputs": inputs, "call_timeout_s": limits.timeout_s}
    return _run(job, source, "", limits.total_timeout_s, limits)


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the process to exit without reaping it (a zombie keeps its process group id taken,
    so the group can be killed safely afterwards); False on timeout."""
    fd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
    return bool(ready)


def _status(returncode: int, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode == -signal.SIGXFSZ or "File too large" in stderr:  # Python ignores SIGXFSZ: EFBIG
        return "output_limit"
    return "memory" if "MemoryError" in stderr else "error"


def _read_calls(path: str) -> list[dict]:
    """The call results written so far; a line cut off by a kill (or garbage) ends the list."""
    calls: list[dict] = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if os.path.exists(path) else []:
        try:
            call = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(call, dict):
            break
        calls.append(call)
    return calls


def _run(job: dict, source: str, stdin: str, wall_s: float, limits: SandboxLimits) -> SandboxRun:
    with tempfile.TemporaryDirectory(prefix="opd-sandbox-", ignore_cleanup_errors=True) as root:
        work = os.path.join(root, "work")
        os.mkdir(work)
        Path(work, "solution.py").write_text(source, encoding="utf-8")
        Path(root, "stdin").write_text(stdin, encoding="utf-8")
        job = {
            **job,
            "result_path": os.path.join(root, "result.jsonl"),
            "sys_path": site.getsitepackages(),
            "memory_mb": limits.memory_mb,
            "cpu_s": math.ceil(wall_s) + 1,
            "max_file_mb": limits.max_output_mb,
        }
        job_path = os.path.join(root, "job.json")
        Path(job_path).write_text(json.dumps(job))
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with (
            open(os.path.join(root, "stdin"), "rb") as f_in,
            open(out_path, "wb") as f_out,
            open(err_path, "wb") as f_err,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-X", "utf8", _CHILD, job_path],
                cwd=work,
                stdin=f_in,
                stdout=f_out,
                stderr=f_err,
                env=_environment(work),
                start_new_session=True,
            )
            try:
                exited = _wait(proc, wall_s)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        stdout = Path(out_path).read_text(encoding="utf-8", errors="replace")
        stderr = Path(err_path).read_text(encoding="utf-8", errors="replace")[-_STDERR_KEEP:]
        calls = _read_calls(job["result_path"])
        return SandboxRun(_status(proc.returncode, not exited, stderr), proc.returncode, stdout, stderr, calls)
