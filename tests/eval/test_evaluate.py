"""``evaluate`` on the example benchmarks with a scripted engine: the numbers, the files, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_opd.config.errors import ConfigError
from megatron_opd.data import DataConfig, DataError
from megatron_opd.eval import EvalConfig, evaluate
from tests.eval.conftest import BENCHMARK_FILES, FIXTURES, ScriptedEngine
from tests.tolerance import float64_approx

N = 4
# The wrong answers that still pass the base tests (see fixtures/make_fixtures.py): EvalPlus' point.
WRONG_PASSES_BASE = {"humanevalplus": [False, True, False], "mbppplus": [True, True]}


def rows(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


def correct_counts(responses: dict) -> dict[str, int]:
    """How many of the N samples of each question the engine answers right: 0..N, cycling."""
    return {q: i % (N + 1) for i, q in enumerate(responses)}


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_evaluate_reports_the_known_numbers(tokenizer: Any, responses: dict, tmp_path: Path) -> None:
    counts = correct_counts(responses)
    engine = ScriptedEngine(tokenizer, responses, lambda q, k: k < counts[q])
    cfg = EvalConfig(n=N, code_timeout_s=2.0, reward_workers=2)
    result = evaluate(engine, tokenizer, BENCHMARK_FILES, cfg, out_dir=tmp_path)

    benchmarks = {"aime24": "aime", "humanevalplus": "humanevalplus", "mbppplus": "mbppplus"}
    benchmarks["livecodebench"] = "livecodebench"
    accuracies = []
    for name, file in benchmarks.items():
        questions = [r["prompt"][-1]["content"] for r in rows(str(FIXTURES / f"{file}.parquet"))]
        c = [counts[q] for q in questions]
        assert result[f"{name}/problems"] == len(questions)
        # float64 means of fractions ≤ 1 (pass@k as a product there, a ratio of binomials here): a few roundings of
        # 1 per problem
        close = len(c) * 8
        assert result[f"{name}/avg@{N}"] == float64_approx(sum(c) / (N * len(c)), 1.0, close)
        for k in (1, 2, 4):
            expected = sum(unbiased_pass_at_k(N, ci, k) for ci in c) / len(c)
            assert result[f"{name}/pass@{k}"] == float64_approx(expected, 1.0, close)
        assert f"{name}/pass@3" not in result
        lengths = [
            len(tokenizer.encode(responses[q]["right" if j < counts[q] else "wrong"], add_special_tokens=False)) + 1
            for q in questions
            for j in range(N)
        ]
        assert result[f"{name}/length/mean"] == float64_approx(sum(lengths) / len(lengths), max(lengths), 4)
        assert (result[f"{name}/length/min"], result[f"{name}/length/max"]) == (min(lengths), max(lengths))
        assert result[f"{name}/truncated"] == 0.0
        if name in WRONG_PASSES_BASE:
            base = sum(ci + (N - ci) * passes for ci, passes in zip(c, WRONG_PASSES_BASE[name]))
            assert result[f"{name}/base/avg@{N}"] == float64_approx(base / (N * len(c)), 1.0, close)
        else:
            assert f"{name}/base/avg@{N}" not in result
        accuracies.append(result[f"{name}/avg@{N}"])
    assert result["accuracy"] == float64_approx(sum(accuracies) / len(accuracies), 1.0, 4 * len(accuracies))

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["accuracy"] == result["accuracy"]
    assert summary["benchmarks"]["aime24"][f"avg@{N}"] == result[f"aime24/avg@{N}"]
    assert summary["config"]["n"] == N and summary["files"] == BENCHMARK_FILES
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == N * len(responses)
    for s in samples:
        question = next(q for q in responses if q in s["prompt"])
        assert s["score"] == float(s["sample"] < counts[question])
        assert s["response"] == responses[question]["right" if s["score"] else "wrong"]
        assert s["finish_reason"] == "stop" and s["response_tokens"] > 0
    aime = next(s for s in samples if s["benchmark"] == "aime24" and s["problem"] == 0 and s["sample"] == 0)
    assert (aime["ground_truth"], aime["row"], aime["file"]) == ("16", 0, BENCHMARK_FILES[0])
    assert aime["details"] == {"answer": "16" if aime["score"] else "12"}
    code = next(s for s in samples if s["benchmark"] == "humanevalplus" and s["score"] == 0.0)
    assert code["details"]["status"] == "wrong_answer"


def test_template_and_max_problems(tokenizer: Any, responses: dict) -> None:
    engine = ScriptedEngine(tokenizer, responses, lambda q, k: True)
    cfg = EvalConfig(n=2, template="gopd_math", max_problems=3)
    result = evaluate(engine, tokenizer, BENCHMARK_FILES[0], cfg)
    assert result["aime24/problems"] == 3 and result["aime24/avg@2"] == 1.0
    assert len(engine.prompts) == 6
    question = rows(BENCHMARK_FILES[0])[0]["prompt"][0]["content"]
    expected = f"{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>"
    assert expected in engine.prompts[0]
    assert engine.prompts[0].endswith("<think>\n\n</think>\n\n")  # Qwen3 non-thinking mode by default
    evaluate(engine, tokenizer, BENCHMARK_FILES[0], cfg, data_cfg=DataConfig(enable_thinking=True))
    assert engine.prompts[-1].endswith("<|im_start|>assistant\n")


def write_rows(path: Path, edits: dict[str, Any]) -> str:
    """The first AIME row with ``edits`` applied, as a one-row parquet file."""
    row = {**rows(BENCHMARK_FILES[0])[0], **edits}
    pq.write_table(pa.Table.from_pylist([row]), path)
    return str(path)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"reward_model": {"ground_truth": None}}, "row 0: no reward_model.ground_truth"),
        ({"reward_model": None}, "row 0: no reward_model.ground_truth"),
        ({"data_source": "gpqa"}, "row 0: data_source='gpqa': no reward for this data source"),
        ({"prompt": None}, "row 0: missing field 'prompt'"),
        (
            {"data_source": "livecodebench"},
            "row 0: reward_model.ground_truth: a code problem.s ground truth must be a JSON object",
        ),
        (
            {"data_source": "humanevalplus", "reward_model": {"ground_truth": json.dumps({"base_input": [[1]]})}},
            "row 0: reward_model.ground_truth.entry_point: missing",
        ),
    ],
)
def test_bad_rows_fail_before_generation(
    edits: dict, message: str, tokenizer: Any, responses: dict, tmp_path: Path
) -> None:
    engine = ScriptedEngine(tokenizer, responses, lambda q, k: True)
    path = write_rows(tmp_path / "bad.parquet", edits)
    with pytest.raises(DataError, match=message):
        evaluate(engine, tokenizer, path, EvalConfig())
    assert engine.prompts == []


def test_failing_reference_fails_before_generation(tokenizer: Any, responses: dict, tmp_path: Path) -> None:
    row = rows(BENCHMARK_FILES[1])[0]
    tests = {**json.loads(row["reward_model"]["ground_truth"]), "canonical_solution": "def running_max(x):\n    1/0"}
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist([{**row, "reward_model": {"ground_truth": json.dumps(tests)}}]), path)
    engine = ScriptedEngine(tokenizer, responses, lambda q, k: True)
    with pytest.raises(DataError, match="canonical_solution: the reference fails on base input 0"):
        evaluate(engine, tokenizer, str(path), EvalConfig())
    assert engine.prompts == []


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (EvalConfig(template="qwen_math"), "eval.template='qwen_math': unknown prompt template. Fix: use one of "
         "gopd_math, gopd_code."),
        (EvalConfig(n=0), "eval.n=0: must be > 0"),
        (EvalConfig(top_p=0.0), "eval.top_p=0.0"),
        (EvalConfig(top_k=0), "eval.top_k=0"),
        (EvalConfig(max_problems=0), "eval.max_problems=0"),
    ],
)  # fmt: skip
def test_bad_config(cfg: EvalConfig, message: str, tokenizer: Any, responses: dict) -> None:
    with pytest.raises(ConfigError) as e:
        evaluate(ScriptedEngine(tokenizer, responses, lambda q, k: True), tokenizer, BENCHMARK_FILES, cfg)
    assert message in str(e.value)
