"""``opd check CONFIG [key=value ...]``: load and validate a run config, print it, start nothing."""

from __future__ import annotations

import argparse
import sys

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.loader import load_config, to_yaml


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opd check", description=__doc__)
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.validate()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0
