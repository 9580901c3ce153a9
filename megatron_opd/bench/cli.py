"""``opd bench <what>``: each benchmark is a module with ``main(argv) -> int``, imported only when asked for."""

from __future__ import annotations

import sys

from megatron_opd.cli import dispatch

BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("megatron_opd.bench.kernels", "vocab-sized kernels vs plain torch / Liger / Megatron: time, memory"),
    "objectives": ("megatron_opd.bench.objectives", "objective losses end to end on the kernels"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("opd bench", BENCHMARKS, list(sys.argv[1:] if argv is None else argv), "benchmarks")
