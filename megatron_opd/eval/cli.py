"""``opd eval --model DIR --data FILE.parquet[,...]``: sample, score and report avg@n / pass@k."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from megatron_opd.config.errors import ConfigError
from megatron_opd.eval.config import EvalConfig
from megatron_opd.eval.templates import PROMPT_TEMPLATES

_ITER_DIR = re.compile(r"^iter_\d{7}$")
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd eval",
        description="Sample answers to benchmark problems (verl parquet: prompt, data_source, "
        "reward_model.ground_truth) and report avg@n, pass@k and response lengths per data_source. "
        "Defaults are the G-OPD paper's evaluation setting.",
    )
    p.add_argument("--model", required=True, help="a Hugging Face model directory")
    p.add_argument(
        "--data", required=True, action="append", help="benchmark files, comma-separated (.parquet or .jsonl)"
    )
    p.add_argument("--n", type=int, default=32, help="samples per problem (paper: 32 for math, 4 for code)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-new-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", choices=sorted(PROMPT_TEMPLATES), help="put each question into this prompt template")
    p.add_argument("--max-problems", type=int, help="only the first N problems of each benchmark")
    p.add_argument("--engine", choices=("hf", "sglang", "vllm"), default="hf", help="rollout engine")
    p.add_argument("--sglang-url", action="append", default=[], help="attach to a running SGLang server (repeatable)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per engine batch (hf)")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 thinking mode in the chat template")
    p.add_argument("--chat-template", help="Jinja chat template (text or file) instead of the tokenizer's")
    p.add_argument("--max-prompt-length", type=int, default=32768, help="longer prompts are an error")
    p.add_argument("--code-timeout", type=float, default=6.0, help="seconds per code test")
    p.add_argument("--code-memory-mb", type=int, default=2048, help="address-space limit of a code sandbox")
    p.add_argument("--workers", type=int, default=8, help="code sandboxes run at once")
    p.add_argument("--out", help="write metrics.json and samples.jsonl here (default: eval_results/<model name>)")
    p.add_argument("--log-level", default="WARNING")
    return p


def resolve_model_dir(path: str) -> str:
    """``path`` when it is a Hugging Face model directory with weights; a ``ConfigError`` saying
    what it is and what to do otherwise (a Megatron checkpoint must be converted first)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError("--model", path, "is not a directory.", "give a Hugging Face model directory.")
    if (p / "config.json").is_file():
        if not any(any(p.glob(pattern)) for pattern in _WEIGHTS):
            raise ConfigError(
                "--model", path, "has a config.json but no weights (*.safetensors).", "give the full model directory."
            )
        return str(p)
    if (p / "latest_checkpointed_iteration.txt").is_file() or _ITER_DIR.match(p.name) or (p / "hf").is_dir():
        raise ConfigError(
            "--model",
            path,
            "is a Megatron checkpoint; opd eval serves Hugging Face weights.",
            "convert it with `opd convert mcore-to-hf` and pass the output directory.",
        )
    raise ConfigError(
        "--model",
        path,
        "is neither a Hugging Face model directory (no config.json) nor a Megatron checkpoint.",
        "give a directory with config.json and *.safetensors.",
    )


def format_table(summary: dict) -> str:
    """``metrics.json`` of ``evaluate`` as a text table: a row per benchmark, scores in percent."""
    benchmarks: dict[str, dict[str, float]] = summary["benchmarks"]
    first = next(iter(benchmarks.values()))
    scores = [k for k in first if k.startswith(("avg@", "pass@"))]
    header = ["benchmark", "problems", *scores, "length", "truncated"]
    rows = [header]
    for name, m in benchmarks.items():
        cells = [f"{100 * m[k]:.2f}" for k in scores]
        rows.append([name, f"{m['problems']:.0f}", *cells, f"{m['length/mean']:.0f}", f"{100 * m['truncated']:.1f}%"])
    rows.append(["average", "", f"{100 * summary['accuracy']:.2f}"])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_opd.data import ChatTemplateError, DataConfig, DataError, TokenizerError, load_tokenizer
    from megatron_opd.eval.runner import evaluate, load_problems
    from megatron_opd.rollout.base import RolloutError
    from megatron_opd.rollout.config import RolloutConfig
    from megatron_opd.rollout.factory import build_engine

    files = [f for arg in args.data for f in arg.split(",") if f]
    cfg = EvalConfig(
        files=files,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        max_problems=args.max_problems,
        seed=args.seed,
        code_timeout_s=args.code_timeout,
        code_memory_mb=args.code_memory_mb,
        reward_workers=args.workers,
    )
    data_cfg = DataConfig(
        max_prompt_length=args.max_prompt_length,
        enable_thinking=args.enable_thinking,
        chat_template=args.chat_template,
    )
    out = args.out or str(Path("eval_results") / Path(args.model).resolve().name)
    try:
        cfg.validate()
        model_dir = resolve_model_dir(args.model)
        tokenizer = load_tokenizer(model_dir)
        load_problems(files, tokenizer, cfg, data_cfg)  # bad data fails here, before the model loads
        rollout = RolloutConfig(engine=args.engine, batch_size=args.batch_size)
        rollout.sglang.urls = list(args.sglang_url)
        engine = build_engine(rollout, model_dir, tokenizer=tokenizer)
        try:
            evaluate(engine, tokenizer, files, cfg, out_dir=out, data_cfg=data_cfg)
        finally:
            engine.shutdown()
    except (ConfigError, DataError, TokenizerError, ChatTemplateError, RolloutError) as e:
        print(f"opd eval: {e}", file=sys.stderr)
        return 2
    metrics = Path(out) / "metrics.json"
    print(format_table(json.loads(metrics.read_text())))
    print(f"\nwrote {metrics} and {Path(out) / 'samples.jsonl'}")
    return 0
