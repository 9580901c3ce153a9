"""``evaluate``: sample ``n`` answers per problem through a rollout engine, score them, aggregate.

Benchmarks are the ``data_source`` values of the rows (verl's convention: ``aime24``, ``humanevalplus``,
...), in order of first appearance. Every row is checked before anything is generated: a prompt that
templates, a data source with a reward, a ground truth (a code problem's tests must parse). All
prompts x ``n`` go to the engine in one ``generate`` call; math is scored in this thread, code in
``cfg.reward_workers`` threads, each test run in its own sandboxed process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megatron_opd.data import DataConfig, DataError, PromptDataset, PromptSample
from megatron_opd.data.templates import encode_prompts, render_chat, resolve_chat_template
from megatron_opd.eval.config import EvalConfig
from megatron_opd.eval.metrics import k_values, length_stats, pass_at_k
from megatron_opd.eval.templates import apply_template
from megatron_opd.rewards import Score, reward_kind, score_batch
from megatron_opd.rewards.code import expected_outputs
from megatron_opd.rewards.code_tests import CallTests, CodeTestsError, StdioTests, parse_tests
from megatron_opd.rewards.sandbox import SandboxLimits
from megatron_opd.rollout.base import Completion, RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)

# Prompts are never truncated in evaluation; longer ones are an error (data_cfg overrides).
EVAL_MAX_PROMPT_LENGTH = 32768
_GROUND_TRUTH_SHOWN = 1000  # characters of the ground truth copied into each sample record


@dataclasses.dataclass
class Problem:
    """One row of a benchmark: its templated prompt and where it came from."""

    benchmark: str
    index: int  # position within its benchmark
    row: PromptSample
    tests: StdioTests | CallTests | None  # a code problem's parsed tests; None for math


def _templated(dataset: PromptDataset, tokenizer: Any, template: str, data_cfg: DataConfig) -> None:
    """Re-render every prompt of ``dataset`` with its last user message put into ``template``."""
    chat = resolve_chat_template(tokenizer, data_cfg.chat_template)
    for s in dataset.samples:
        s.messages = apply_template(s.messages, template)
    texts = [render_chat(tokenizer, s.messages, chat, data_cfg.enable_thinking) for s in dataset.samples]
    for s, ids in zip(dataset.samples, encode_prompts(tokenizer, texts)):
        if len(ids) > data_cfg.max_prompt_length:
            raise DataError(
                f"{s.origin}: the prompt in template {template!r} has {len(ids)} tokens > max_prompt_length="
                f"{data_cfg.max_prompt_length}. Fix: raise the limit (data.max_prompt_length / --max-prompt-length)."
            )
        s.prompt_ids = ids


def _check_scorable(row: PromptSample) -> StdioTests | CallTests | None:
    """Fail unless ``row`` can be scored; a code problem's parsed tests."""
    try:
        kind = reward_kind(row.data_source)
    except ValueError as e:
        raise DataError(f"{row.origin}: {e}") from e
    if row.ground_truth is None or (isinstance(row.ground_truth, str) and not row.ground_truth.strip()):
        what = "its answer (LaTeX or plain text)" if kind == "math" else "its unit tests (JSON)"
        raise DataError(f"{row.origin}: no reward_model.ground_truth. Fix: every evaluation row needs {what} there.")
    if kind == "math":
        return None
    try:
        return parse_tests(row.ground_truth)
    except CodeTestsError as e:
        raise DataError(f"{row.origin}: {e}") from e


def _run_references(problems: list[Problem], limits: SandboxLimits, workers: int) -> None:
    """Run every reference solution (EvalPlus) once before generating: a broken one fails before the
    expensive part, and its outputs are cached for scoring."""
    with_reference = [p for p in problems if isinstance(p.tests, CallTests) and p.tests.expected is None]
    with ThreadPoolExecutor(workers) as pool:
        futures = [(p, pool.submit(expected_outputs, p.tests, limits)) for p in with_reference]
        for p, future in futures:
            try:
                future.result()
            except CodeTestsError as e:
                raise DataError(f"{p.row.origin}: {e}") from e


def load_problems(
    files: Sequence[str], tokenizer: Any, cfg: EvalConfig, data_cfg: DataConfig | None = None
) -> dict[str, list[Problem]]:
    """The problems of ``files`` by benchmark (``data_source``), templated and checked, at most
    ``cfg.max_problems`` per benchmark. ``DataError`` naming the file and row for a bad one."""
    data_cfg = data_cfg or DataConfig(max_prompt_length=EVAL_MAX_PROMPT_LENGTH)
    dataset = PromptDataset(list(files), tokenizer, data_cfg)
    if cfg.template:
        _templated(dataset, tokenizer, cfg.template, data_cfg)
    benchmarks: dict[str, list[Problem]] = {}
    for row in dataset.samples:
        tests = _check_scorable(row)
        problems = benchmarks.setdefault(row.data_source, [])
        if cfg.max_problems is None or len(problems) < cfg.max_problems:
            problems.append(Problem(row.data_source, len(problems), row, tests))
    return benchmarks


def _benchmark_metrics(n: int, scores: list[list[Score]], lengths: list[int], finishes: list[str]) -> dict[str, float]:
    values = [s.value for problem in scores for s in problem]
    metrics: dict[str, float] = {"problems": float(len(scores)), "samples_per_problem": float(n)}
    metrics[f"avg@{n}"] = statistics.fmean(values)
    correct = [sum(s.value >= 1.0 for s in problem) for problem in scores]
    for k in k_values(n):
        metrics[f"pass@{k}"] = statistics.fmean(pass_at_k(n, c, k) for c in correct)
    base = [s.details["groups"]["base"] for problem in scores for s in problem if "base" in s.details.get("groups", {})]
    if base:  # EvalPlus: the base tests alone (HumanEval / MBPP) beside base + plus (HumanEval+ / MBPP+)
        metrics[f"base/avg@{n}"] = statistics.fmean(map(float, base))
    metrics.update({f"length/{k}": v for k, v in length_stats(lengths).items()})
    metrics["truncated"] = sum(f == "length" for f in finishes) / len(finishes)
    return metrics


def _shown(ground_truth: Any) -> Any:
    text = ground_truth if isinstance(ground_truth, str) else json.dumps(ground_truth)
    return text if len(text) <= _GROUND_TRUTH_SHOWN else text[:_GROUND_TRUTH_SHOWN] + "..."


def _write_outputs(
    out: Path,
    summary: dict[str, Any],
    tokenizer: Any,
    samples: list[tuple[Problem, int]],
    texts: list[str],
    completions: list[Completion],
    scores: list[Score],
) -> None:
    """``metrics.json`` (``summary``) and ``samples.jsonl`` (one record per sample) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    prompt_texts = {id(p): tokenizer.decode(p.row.prompt_ids) for p, _ in samples}
    with open(out / "samples.jsonl", "w") as f:
        for (p, j), text, completion, score in zip(samples, texts, completions, scores):
            record = {
                "benchmark": p.benchmark,
                "problem": p.index,
                "sample": j,
                "file": p.row.file,
                "row": p.row.row,
                "prompt": prompt_texts[id(p)],
                "response": text,
                "response_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason,
                "score": score.value,
                "details": score.details,
                "ground_truth": _shown(p.row.ground_truth),
            }
            f.write(json.dumps(record) + "\n")


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    files: str | Sequence[str],
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    data_cfg: DataConfig | None = None,
) -> dict[str, float]:
    """Sample ``cfg.n`` responses per problem of ``files`` with ``engine``, score them, and return
    flat metrics: ``{benchmark}/avg@{n}``, ``{benchmark}/pass@{k}`` (k = 1, 2, 4, ..., n),
    ``{benchmark}/length/{mean,std,min,median,max}`` (response tokens), ``{benchmark}/truncated``
    (share cut at ``max_new_tokens``), ``{benchmark}/problems``, EvalPlus' ``{benchmark}/base/avg@{n}``,
    and ``accuracy``: the mean of avg@n over benchmarks (the papers' "Avg." column).

    ``data_cfg``: how prompts are rendered (chat template, ``enable_thinking``, ``max_prompt_length``);
    the trainer passes its ``data`` section. ``out_dir``: also write ``metrics.json`` (metrics by
    benchmark, the config, timings) and ``samples.jsonl`` (every sample with its score and details).
    """
    cfg.validate()
    files = [files] if isinstance(files, str) else list(files)
    benchmarks = load_problems(files, tokenizer, cfg, data_cfg)
    problems = [p for group in benchmarks.values() for p in group]
    eos = getattr(tokenizer, "eos_token_id", None)
    sampling = SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=(eos,) if eos is not None else (),
        seed=cfg.seed,
    )
    limits = SandboxLimits(timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb)
    _run_references(problems, limits, cfg.reward_workers)
    start = time.perf_counter()
    prompts = [p.row.prompt_ids for p in problems for _ in range(cfg.n)]
    completions = engine.generate(prompts, sampling)
    if len(completions) != len(prompts):
        raise RuntimeError(f"the rollout engine returned {len(completions)} completions for {len(prompts)} prompts.")
    generated = time.perf_counter()
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    samples = [(p, j) for p in problems for j in range(cfg.n)]
    items = [(p.row.data_source, text, p.row.ground_truth, p.row.extra_info) for (p, _), text in zip(samples, texts)]
    scores = score_batch(items, limits, cfg.reward_workers)
    scored = time.perf_counter()

    by_benchmark: dict[str, dict[str, float]] = {}
    offset = 0
    for name, group in benchmarks.items():
        size = len(group) * cfg.n
        part = slice(offset, offset + size)
        per_problem = [scores[offset + i * cfg.n : offset + (i + 1) * cfg.n] for i in range(len(group))]
        lengths = [len(c.token_ids) for c in completions[part]]
        by_benchmark[name] = _benchmark_metrics(
            cfg.n, per_problem, lengths, [c.finish_reason for c in completions[part]]
        )
        offset += size
    results = {f"{name}/{k}": v for name, metrics in by_benchmark.items() for k, v in metrics.items()}
    results["accuracy"] = statistics.fmean(m[f"avg@{cfg.n}"] for m in by_benchmark.values())
    timings = {"generate_s": generated - start, "score_s": scored - generated}
    logger.info("evaluated %d problems x %d samples: %s (%s)", len(problems), cfg.n, results, timings)

    if out_dir is not None:
        summary = {"accuracy": results["accuracy"], "benchmarks": by_benchmark, "files": files}
        summary.update(config=dataclasses.asdict(cfg), time=timings)
        _write_outputs(Path(out_dir), summary, tokenizer, samples, texts, completions, scores)
    return results
