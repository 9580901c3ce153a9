"""``python -m sglang.launch_server ...`` run as ``opd serve``: SGLang's command line as the launcher
builds it (``sglang_server_commands``), the flags ``opd serve`` has no use for (GPUs, memory pool,
NCCL port) dropped. :func:`standin_python` writes an executable that takes the place of the
``python`` argument, so launched "SGLang" servers are ``opd serve`` processes on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

LAUNCH = ["-m", "sglang.launch_server"]
DROPPED = ("--tp-size", "--dp-size", "--mem-fraction-static", "--base-gpu-id", "--nccl-port")  # each with a value


def serve_args(argv: list[str]) -> list[str]:
    """``opd serve`` arguments for the ``sglang.launch_server`` arguments ``argv`` (after ``-m ...``)."""
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in DROPPED:
            rest.pop(0)
        else:
            out.append(arg)
    return [*out, "--batch-size", "4"]


def standin_python(directory: Path) -> str:
    """An executable in ``directory`` that runs ``<it> -m sglang.launch_server ARGS`` as ``opd serve``."""
    path = directory / "sglang_standin_python"
    root = Path(__file__).resolve().parents[2]  # the repository: tests.rollout importable from any directory
    path.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(root)!r})\n"
        "from tests.rollout.sglang_standin import main\nmain()\n"
    )
    path.chmod(0o755)
    return str(path)


def main() -> None:
    argv = sys.argv[1:]
    if argv[: len(LAUNCH)] != LAUNCH:
        raise SystemExit(f"sglang stand-in: expected {' '.join(LAUNCH)} ..., got {argv}")
    command = [sys.executable, "-m", "megatron_opd.cli", "serve", *serve_args(argv[len(LAUNCH) :])]
    os.execve(sys.executable, command, {**os.environ, "OMP_NUM_THREADS": "1"})
