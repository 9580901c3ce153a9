"""``opd train CONFIG [key=value ...]``: on-policy distillation, the main job."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.loader import load_config
from megatron_opd.data import ChatTemplateError, DataError, TokenizerError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="opd train",
        description="Train a student by on-policy distillation. Overrides are verl-style key=value "
        "(e.g. trainer.steps=10 objective.lambda=1.25 run_dir=runs/x).",
    )
    parser.add_argument("config", help="YAML run config, e.g. configs/demo/cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_opd.trainer.driver import run_training

        summary = run_training(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (DataError, TokenizerError, ChatTemplateError) as e:  # bad data or tokenizers: the message names the fix
        print(f"input error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    signum = summary.get("interrupted_by_signal")
    return 128 + signum if signum else 0
