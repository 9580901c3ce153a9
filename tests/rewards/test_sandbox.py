"""The sandbox: limits, network and process isolation, the kill of the whole process group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_opd.rewards.sandbox import SandboxLimits, run_calls, run_script
from megatron_opd.rewards.sandbox_child import decode_value, encode_value

FAST = SandboxLimits(timeout_s=1.0, total_timeout_s=3.0, memory_mb=512, max_output_mb=1)


def _network_namespaces() -> bool:
    """Whether this kernel lets a process enter a new network namespace (as the sandbox tries)."""
    code = (
        "import ctypes,sys; u=ctypes.CDLL(None).unshare; "
        "sys.exit(0 if u(0x40000000)==0 or u(0x40000000|0x10000000)==0 else 1)"
    )
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def _devices(proc_net_dev: str) -> list[str]:
    """Interface names in the text of ``/proc/net/dev`` (its device lines are the ones with a colon)."""
    return [line.split(":")[0].strip() for line in proc_net_dev.splitlines() if ":" in line]


def test_passing_program_reads_stdin() -> None:
    run = run_script("print(sum(map(int, input().split())))", "2 3\n", FAST)
    assert (run.status, run.returncode, run.stdout) == ("ok", 0, "5\n")


def test_crashing_program() -> None:
    run = run_script("raise ValueError('boom')", "", FAST)
    assert run.status == "error" and run.returncode == 1
    assert "ValueError: boom" in run.stderr


def test_nonzero_exit() -> None:
    run = run_script("import sys; sys.exit(3)", "", FAST)
    assert (run.status, run.returncode) == ("error", 3)


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_and_sleep_are_killed_at_the_wall_clock_limit(program: str) -> None:
    start = time.monotonic()
    run = run_script(program, "", FAST)
    elapsed = time.monotonic() - start
    assert run.status == "timeout"
    assert FAST.timeout_s <= elapsed < FAST.timeout_s + 1.5


def test_memory_bomb_hits_the_address_space_limit() -> None:
    limits = SandboxLimits(timeout_s=10.0, memory_mb=256)  # the limit, not the clock, must stop it
    run = run_script("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", "", limits)
    assert run.status == "memory"
    run = run_script("x = bytearray(10**10)", "", limits)
    assert run.status == "memory"


def test_output_flood_hits_the_file_size_limit() -> None:
    run = run_script("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "", FAST)
    assert run.status == "output_limit"
    assert len(run.stdout) <= FAST.max_output_mb << 20


def test_network_is_refused() -> None:
    """A program connecting to a server listening on this machine gets an error; the server sees nobody."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        run = run_script(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", "", FAST)
        assert run.status == "error"
        assert "PermissionError: sandbox: socket" in run.stderr
        with pytest.raises(TimeoutError):
            server.accept()
    assert "not allowed" in run_script("import _socket\n_socket.socket()", "", FAST).stderr  # the C module too


@pytest.mark.parametrize(
    "program",
    [
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.fork()",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import ctypes\nctypes.CDLL('libc.so.6')",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    ],
)
def test_processes_signals_ctypes_and_limits_are_refused(program: str) -> None:
    run = run_script(program, "", FAST)
    assert run.status == "error" and "PermissionError: sandbox:" in run.stderr


def test_writes_stay_in_the_working_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    run = run_script(f"open({str(outside)!r}, 'w').write('x')", "", FAST)
    assert run.status == "error" and not outside.exists()
    run = run_script(f"import os\nos.remove({str(tmp_path)!r})", "", FAST)
    assert run.status == "error" and tmp_path.exists()
    run = run_script("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", "", FAST)
    assert (run.status, run.stdout) == ("ok", "ok\n")


def test_children_are_killed_and_share_the_network_namespace() -> None:
    """``multiprocessing.util.spawnv_passfds`` reaches ``_posixsubprocess`` without an audit event:
    the hook's documented gap. The grandchild still runs in the sandbox's network namespace, and the
    group kill at the time limit ends it."""
    grandchild = "import time; print(open('/proc/net/dev').read(), flush=True); time.sleep(60)"
    program = (
        "import os, sys, time\n"
        "from multiprocessing.util import spawnv_passfds\n"
        f"pid = spawnv_passfds(os.fsencode(sys.executable), [sys.executable, '-c', {grandchild!r}], [])\n"
        "print('PID', pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    run = run_script(program, "", SandboxLimits(timeout_s=3.0))  # time for the grandchild to start
    assert run.status == "timeout"
    pid = int(run.stdout.split("PID")[1].split()[0])
    if _network_namespaces():
        assert _devices(run.stdout) == ["lo"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # killed, waiting for init to reap it
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the grandchild survived the group kill")


@pytest.mark.skipif(not _network_namespaces(), reason="this kernel allows no new network namespace")
def test_network_namespace_has_only_loopback() -> None:
    run = run_script("print(open('/proc/net/dev').read())", "", FAST)
    assert _devices(run.stdout) == ["lo"]


def test_calls_return_values_with_their_types() -> None:
    source = "def f(a, b):\n    print('noise')\n    return (a + b, {a}, {a: [b]}, float('inf'), b'x', None)\n"
    run = run_calls(source, "f", [[1, 2], [3, 4]], FAST)
    assert run.status == "ok"
    assert [decode_value(c["value"]) for c in run.calls] == [
        (3, {1}, {1: [2]}, float("inf"), b"x", None),
        (7, {3}, {3: [4]}, float("inf"), b"x", None),
    ]


def test_calls_stop_at_the_first_error_and_time_out_per_call() -> None:
    source = "def f(x):\n    if x == 2:\n        while True:\n            pass\n    return x\n"
    run = run_calls(source, "f", [[1], [2], [3]], FAST)
    assert run.calls[0] == {"value": 1}
    assert run.calls[1]["error"].startswith("TimeoutError")
    assert len(run.calls) == 2


def test_calls_find_leetcode_methods_and_report_bad_programs() -> None:
    run = run_calls("class Solution:\n    def twice(self, x):\n        return 2 * x\n", "twice", [[4]], FAST)
    assert run.calls == [{"value": 8}]
    assert run_calls("def g():\n    pass\n", "f", [[1]], FAST).calls[0]["error"].startswith("NameError")
    assert run_calls("def f(:\n", "f", [[1]], FAST).calls[0]["error"].startswith("SyntaxError")
    top_level_loop = run_calls("while True:\n    pass\n", "f", [[1]], FAST)
    assert top_level_loop.calls[0]["error"].startswith("TimeoutError")


def test_encode_value_round_trip() -> None:
    value = [1, 2.5, "s", (1, (2,)), {3}, frozenset({4}), {(1, 2): "t"}, b"\x00", 1 + 2j, None, True, -float("inf")]
    assert decode_value(encode_value(value)) == value
    assert type(decode_value(encode_value((1,)))) is tuple

    class Opaque:
        def __repr__(self) -> str:
            return "opaque"

    assert decode_value(encode_value(Opaque())).endswith("Opaque:opaque>")


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"SandboxLimits\.timeout_s"):
        SandboxLimits(timeout_s=0)
