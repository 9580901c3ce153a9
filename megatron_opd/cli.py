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
    "bench": ("megatron_opd.bench.cli", "benchmarks: kernels | objectives"),
    "plot": ("megatron_opd.trainer.plot", "write PNG curves of a run's metrics.jsonl"),
    "check": ("megatron_opd.config.check", "validate a config without starting anything"),
    "selftest": ("megatron_opd.selftest.cli", "check this node before a long job: versions, kernels, models, NCCL"),
    "compare": ("megatron_opd.compare.cli", "train every objective on one task, seeds alike: table + curves"),
}


def usage(prog: str, commands: dict[str, tuple[str, str]], heading: str, intro: str = "") -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} <{heading.rstrip('s')}> [args ...]", ""]
    lines += [intro, ""] if intro else []
    lines += [f"{heading}:", *(f"  {name:<{width}}  {desc}" for name, (_, desc) in commands.items())]
    return "\n".join(lines)


def dispatch(
    prog: str, commands: dict[str, tuple[str, str]], argv: list[str], heading: str = "commands", intro: str = ""
) -> int:
    """Run ``commands[argv[0]]``'s ``main(argv[1:])``, importing its module only then."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog, commands, heading, intro))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(
            f"{prog}: unknown {heading.rstrip('s')} {name!r}\n\n{usage(prog, commands, heading, intro)}",
            file=sys.stderr,
        )
        return 2
    return int(importlib.import_module(commands[name][0]).main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    intro = "On-policy distillation on Megatron-Core. Run `opd <command> --help` for a command's arguments."
    return dispatch("opd", SUBCOMMANDS, argv, "commands", intro)


if __name__ == "__main__":
    sys.exit(main())
