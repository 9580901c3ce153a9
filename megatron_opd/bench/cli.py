"""``opd bench <what>``: each benchmark is a module with ``main(argv) -> int``, imported only when asked for."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("megatron_opd.bench.kernels", "vocab-sized kernels vs plain torch / Liger / Megatron: time, memory"),
    "objectives": ("megatron_opd.bench.objectives", "objective losses end to end on the kernels"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: opd bench <benchmark> [args ...]", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"opd bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = BENCHMARKS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"opd bench {name}: not built yet in this version of megatron_opd.", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)
