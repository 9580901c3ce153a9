"""``opd``: the command line. Each subcommand lives in its subsystem as ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_opd.trainer.cli", "run on-policy distillation: opd train CONFIG [key=value ...]"),
    "convert": ("megatron_opd.convert.cli", "convert checkpoints: hf-to-mcore | mcore-to-hf | extrapolate (ExPO)"),
    "eval": ("megatron_opd.eval.cli", "sample and score a model on benchmarks (avg@k, pass@k)"),
    "serve": ("megatron_opd.rollout.server", "serve an HF model behind SGLang's HTTP API (CPU rollouts)"),
    "bench": ("megatron_opd.bench.cli", "benchmarks: kernels | objectives | model"),
    "plot": ("megatron_opd.trainer.plot", "write PNG curves of a run's metrics.jsonl"),
    "check": ("megatron_opd.config.check", "validate a config without starting anything"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: opd <command> [args ...]", "", "On-policy distillation on Megatron-Core.", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run `opd <command> --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"opd: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"opd {name}: not built yet in this version of megatron_opd.", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
