"""``opd compare CONFIG [key=value ...] --objectives opd,exopd,... --seeds N``: train every objective on the
config's task with the same sample budget and seeds, then write the table (markdown + JSON) and the curves."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from megatron_opd.bench.common import list_arg
from megatron_opd.config.errors import ConfigError
from megatron_opd.config.loader import load_config
from megatron_opd.config.schema import model_hf_dir
from megatron_opd.objectives.registry import OBJECTIVE_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd compare", description=__doc__)
    parser.add_argument("config", help="the run config every objective trains with, e.g. configs/demo/cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    parser.add_argument("--objectives", type=list_arg(OBJECTIVE_NAMES), default=list(OBJECTIVE_NAMES))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per objective: seed, seed+1, ... (config)")
    parser.add_argument("--top-k", type=int, default=8, help="support size K of aopd, lsm and gkd")
    parser.add_argument("--out", default="runs/compare", help="run directories and default outputs")
    parser.add_argument("--json", default=None, help="results JSON (default OUT/results.json)")
    parser.add_argument("--markdown", default=None, help="table (default OUT/results.md)")
    parser.add_argument("--png", default=None, help="curves (default OUT/curves.png)")
    return parser


def main(argv: list[str]) -> int:
    from megatron_opd.compare import report, runs

    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.seeds < 1 or args.top_k < 1:
        parser.error(f"--seeds {args.seeds} and --top-k {args.top_k} must both be >= 1")
    out = Path(args.out)
    started = time.time()
    load_start = os.getloadavg()
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.demo_assets:  # built once, before the runs (they would race to build it)
            from megatron_opd.demo.build import build_demo_assets

            build_demo_assets(cfg.demo_assets)
        if not cfg.eval.files:
            raise ConfigError(
                "eval.files", cfg.eval.files, "the comparison evaluates on held-out data.", "set eval.files."
            )
        seeds = [cfg.seed + i for i in range(args.seeds)]
        plan = runs.plan_runs(args.objectives, seeds, out, args.overrides, args.top_k)
        for spec in plan[: len(args.objectives)]:  # every objective's config, checked before any training
            load_config(args.config, list(spec.overrides)).validate()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    records = []
    for i, spec in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {spec.objective} seed {spec.seed} -> {spec.run_dir}", flush=True)
        record = runs.execute(spec, args.config, cfg)
        records.append(record)
        print(f"  {_status(record)}", flush=True)
    finished = [r for r in records if "error" not in r]
    if not finished:
        print("every run failed; see the train.log files under " + str(out), file=sys.stderr)
        return 1
    results = {
        "config": args.config,
        "overrides": args.overrides,
        "objectives": args.objectives,
        "seeds": seeds,
        "top_k": args.top_k,
        "objective_overrides": {n: list(runs.OBJECTIVE_OVERRIDES[n]) for n in args.objectives},
        "budget": {
            "steps": cfg.trainer.steps,
            "train_batch_size": cfg.data.train_batch_size,
            "rollout_n": cfg.rollout.n,
            "samples_per_run": cfg.trainer.steps * cfg.data.train_batch_size * cfg.rollout.n,
        },
        "eval": {"files": cfg.eval.files, "n": cfg.eval.n, "temperature": cfg.eval.temperature},
        "student_before": {
            "accuracy": finished[0]["accuracy_before"],
            "reverse_kl": runs.heldout_reverse_kl(cfg, model_hf_dir(cfg.student.path), seeds[0]),
        },
        "teacher": {"accuracy": finished[0]["teacher_accuracy"]},
        "runs": records,
        "summary": report.summarize(records, args.objectives),
        "machine": _machine(load_start),
        "wall_s": round(time.time() - started, 1),
    }
    json_path = Path(args.json) if args.json else out / "results.json"
    md_path = Path(args.markdown) if args.markdown else out / "results.md"
    png_path = Path(args.png) if args.png else out / "curves.png"
    report.write_outputs(results, json_path, md_path, png_path)
    print(report.markdown_table(results))
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return 0 if len(finished) == len(records) else 1


def _status(record: dict[str, Any]) -> str:
    if "error" in record:
        return "FAILED: " + record["error"].strip().splitlines()[0]
    gap = record["gap_closed"]
    return (
        f"accuracy {record['accuracy_before']:.3f} -> {record['accuracy']:.3f}"
        + (f" ({gap:.0%} of the gap)" if gap is not None else "")
        + f", reverse KL {record['reverse_kl']:.3f}, {record['wall_s']} s"
    )


def _machine(load_start: tuple[float, float, float]) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
