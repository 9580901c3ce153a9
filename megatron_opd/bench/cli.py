"""``opd bench <what>``: each benchmark is a module with ``main(argv) -> int``, imported only when asked for."""

from __future__ import annotations

import sys

from megatron_opd.cli import dispatch

BENCHMARKS: dict[str, tuple[str, str]] = {
    "async": ("megatron_opd.bench.async_pipeline", "opd train at each trainer.max_staleness: wall per step, overlap"),
    "kernels": ("megatron_opd.bench.kernels", "vocab-sized kernels vs plain torch / Liger / Megatron: time, memory"),
    "objectives": ("megatron_opd.bench.objectives", "objective losses end to end on the kernels"),
    "student-step": ("megatron_opd.bench.student_step", "student forward+backward at Qwen3 shapes: tokens/s, MFU"),
    "teacher-scoring": ("megatron_opd.bench.teacher_scoring", "MoE teacher forward + top-K: tokens/s, top-K share"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("opd bench", BENCHMARKS, list(sys.argv[1:] if argv is None else argv), "benchmarks")
