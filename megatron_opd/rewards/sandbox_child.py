"""What runs inside the sandbox: confine this process, then run the candidate program.

Started by ``sandbox`` as ``python -I -S sandbox_child.py JOB.json`` with a temporary working
directory as cwd. Standard library only (it never imports ``megatron_opd``). In order:

1. resource limits (``setrlimit``): address space, CPU seconds, size of any file written (this caps
   stdout, which goes to a file), no core dumps;
2. a network namespace of its own (``unshare(CLONE_NEWNET)``, inside a new user namespace when not
   privileged): the kernel gives it only a loopback device that is down, for this process and every
   child it could start;
3. an audit hook (PEP 578) that refuses socket creation, starting processes, ``ctypes`` library
   loading, signals to other processes, raising resource limits, and file writes or deletions
   outside the working directory;
4. the candidate program: ``script`` mode runs it as ``__main__`` (stdin/stdout from the parent);
   ``call`` mode calls one of its functions on each argument list and writes the return values,
   encoded by ``encode_value``, to the result file opened before the hook was installed.

The audit hook is a guard against accidents and naive misbehaviour, not a security boundary: code
can reach C directly through modules already imported (``_posixsubprocess``, ``posix``), and it
runs in the same process as the harness, so it could forge the result file. The namespace (when the
kernel allows it) and the limits are enforced by the kernel.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import ctypes
import io
import json
import math
import os
import resource
import runpy
import signal
import sys
from typing import Any

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_BLOCKED_EVENTS = frozenset(
    {
        "socket.__new__",
        "socket.bind",
        "socket.connect",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.sendto",
        "socket.sendmsg",
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "os.kill",
        "os.killpg",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "resource.setrlimit",
        "resource.prlimit",
    }
)
_PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.chmod",
        "os.chown",
        "os.link",
        "os.mkdir",
        "os.symlink",
        "os.truncate",
        "os.utime",
        "shutil.rmtree",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class CallTimeout(BaseException):
    """A function call ran past its time limit (a BaseException so ``except Exception`` misses it)."""


# --- the wire format of call-mode results ------------------------------------------------------


def encode_value(value: Any) -> Any:
    """A JSON-able tagged tree of a return value that keeps Python types apart (tuple vs list, set,
    bytes, dicts with non-string keys, non-finite floats). Other objects become their repr."""
    if value is None or isinstance(value, (bool, str)) or type(value) is int:
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if type(value) is list:
        return [encode_value(v) for v in value]
    if type(value) in (tuple, set, frozenset):
        return {type(value).__name__: [encode_value(v) for v in value]}
    if type(value) is dict:
        return {"dict": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if type(value) is bytes:
        return {"bytes": value.hex()}
    if type(value) is complex:
        return {"complex": [value.real, value.imag]}
    return {"repr": f"{type(value).__qualname__}:{value!r}"}


def decode_value(tree: Any) -> Any:
    """Inverse of ``encode_value`` (an object that was encoded as its repr comes back as that string,
    prefixed with its type name, so it equals only an identical repr)."""
    if isinstance(tree, list):
        return [decode_value(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    ((tag, body),) = tree.items()
    if tag == "float":
        return float(body)
    if tag in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](decode_value(v) for v in body)
    if tag == "dict":
        return {decode_value(k): decode_value(v) for k, v in body}
    if tag == "bytes":
        return bytes.fromhex(body)
    if tag == "complex":
        return complex(*body)
    return "<object " + body + ">"


# --- confinement --------------------------------------------------------------------------------


def _set_limits(job: dict) -> None:
    memory = job["memory_mb"] << 20
    cpu = math.ceil(job["cpu_s"])
    for res, value in (
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, job["max_file_mb"] << 20),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, (value, value))


def _isolate_network() -> None:
    """Enter a new network namespace: directly when privileged, else inside a new user namespace;
    where the kernel refuses both, only the audit hook guards the network."""
    unshare = ctypes.CDLL(None, use_errno=True).unshare
    if unshare(_CLONE_NEWNET) != 0:
        unshare(_CLONE_NEWNET | _CLONE_NEWUSER)


def _install_guard(workdir: str) -> None:
    root = os.path.realpath(workdir)

    def inside(path: Any) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        full = os.path.realpath(os.fsdecode(path))
        return full == root or full.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
        elif event in _PATH_EVENTS:
            if not inside(args[0]) or (event in ("os.rename", "os.link", "os.symlink") and not inside(args[1])):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.addaudithook(hook)


# --- running the candidate ----------------------------------------------------------------------


def _find_callable(namespace: dict, fn_name: str) -> Any:
    """``fn_name`` at module level, else a method of ``class Solution`` (LeetCode style)."""
    if callable(namespace.get(fn_name)):
        return namespace[fn_name]
    solution = namespace.get("Solution")
    if isinstance(solution, type) and callable(getattr(solution, fn_name, None)):
        return getattr(solution(), fn_name)
    raise NameError(f"the program defines no function {fn_name!r} (nor a method Solution.{fn_name})")


def _on_alarm(signum: int, frame: Any) -> None:
    raise CallTimeout


def _run_calls(job: dict, source: str, result_file: io.TextIOBase, quiet: io.TextIOBase) -> None:
    """Call the function on each argument list, its prints going to ``quiet``; stop at the first call
    that raises or times out. One JSON line per call: ``{"value": tree}`` or ``{"error": "Type: message"}``."""
    namespace: dict[str, Any] = {"__name__": "__solution__", "__builtins__": builtins}
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, job["call_timeout_s"])  # module-level code gets one call's time
    try:
        with contextlib.redirect_stdout(quiet):
            exec(compile(source, "solution.py", "exec"), namespace)
        fn = _find_callable(namespace, job["fn_name"])
    except CallTimeout:
        fn = None
        error = f"TimeoutError: the program's top level ran past {job['call_timeout_s']} s"
    except BaseException as e:  # the program itself failed: report as the first call's error
        fn = None
        error = f"{type(e).__name__}: {e}"[:1000]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if fn is None:
        result_file.write(json.dumps({"error": error}) + "\n")
        return
    for args in job["inputs"]:
        signal.setitimer(signal.ITIMER_REAL, job["call_timeout_s"])
        try:
            with contextlib.redirect_stdout(quiet):
                line = {"value": encode_value(fn(*copy.deepcopy(args)))}
        except CallTimeout:
            line = {"error": f"TimeoutError: the call ran past {job['call_timeout_s']} s"}
        except BaseException as e:
            line = {"error": f"{type(e).__name__}: {e}"[:1000]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        result_file.write(json.dumps(line) + "\n")
        result_file.flush()
        if "error" in line:
            return


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    sys.path[:0] = job["sys_path"]
    sys.dont_write_bytecode = True
    if hasattr(sys, "set_int_max_str_digits"):  # Python >= 3.10.7
        sys.set_int_max_str_digits(0)  # big integers print in full, as on a judge
    # opened before the guard, which would refuse them
    result_file = open(job["result_path"], "w")
    quiet = open(os.devnull, "w")
    _set_limits(job)
    _isolate_network()
    _install_guard(os.getcwd())
    if job["mode"] == "script":
        sys.argv = ["solution.py"]
        runpy.run_path("solution.py", run_name="__main__")
    else:
        with open("solution.py") as f:
            source = f.read()
        _run_calls(job, source, result_file, quiet)
    result_file.close()


if __name__ == "__main__":
    main(sys.argv[1])
