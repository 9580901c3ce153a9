"""``opd check CONFIG [key=value ...]``: load and validate a run config, print it with an estimate
of the host memory per node at checkpoints (:mod:`megatron_opd.trainer.host_memory`), start nothing."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.loader import load_config, to_yaml


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opd check", description=__doc__)
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=int(os.environ.get("OPD_GPUS_PER_NODE") or 8),
        help="GPUs per node for the host-memory estimate (default: $OPD_GPUS_PER_NODE or 8)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        hf = cfg.validate()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from megatron_opd.trainer.host_memory import host_memory_report

    print(to_yaml(cfg), end="")
    print(host_memory_report(cfg, hf, args.gpus_per_node), end="")
    return 0
