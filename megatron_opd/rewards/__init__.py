"""Outcome rewards, dispatched by ``data_source`` (verl's convention): math answers by Math-Verify,
code by unit tests in a sandboxed subprocess. The trainer (AOPD's accuracy filter, logging) calls
``compute_score`` (or ``score_batch`` for many responses at once); the evaluator calls ``score_batch``
for the details it writes per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from megatron_opd.rewards.code import check_code
from megatron_opd.rewards.code_tests import CodeTestsError
from megatron_opd.rewards.math import extract_boxed, score_math
from megatron_opd.rewards.sandbox import SandboxLimits

# data_source prefixes (lower case) -> reward kind. A data source matches its longest prefix.
DATA_SOURCES: dict[str, str] = {
    **dict.fromkeys(
        (
            "aime",
            "amc",
            "hmmt",
            "math",
            "lighteval/math",
            "digitallearninggmbh/math-lighteval",
            "openai/gsm8k",
            "gsm8k",
            "deepmath",
            "deepscaler",
            "numina",
            "olympiad",
            "minerva",
            "brumo",
            "beyondaime",
            "demo_arith",  # the CPU demo's addition task (megatron_opd.demo)
        ),
        "math",
    ),
    **dict.fromkeys(
        (
            "humaneval",
            "mbpp",
            "evalplus",
            "livecodebench",
            "lcb",
            "codecontests",
            "code_contests",
            "codeforces",
            "apps",
            "taco",
            "leetcode",
            "eurus",
            "primeintellect",
            "code",
        ),
        "code",
    ),
}


@dataclasses.dataclass
class Score:
    """A reward and what it was judged on: math ``{"answer": extracted or None}``; code
    ``{"status", "groups", "detail"}`` (``code.CodeResult``)."""

    value: float
    details: dict[str, Any]


def reward_kind(data_source: str) -> str:
    """``math`` or ``code`` for a data source, by its longest known prefix (case-insensitive)."""
    source = str(data_source).lower()
    matches = [prefix for prefix in DATA_SOURCES if source.startswith(prefix)]
    if not matches:
        raise ValueError(
            f"data_source={data_source!r}: no reward for this data source. Fix: name it with one of the "
            f"known prefixes: math {_prefixes('math')}; code {_prefixes('code')}."
        )
    return DATA_SOURCES[max(matches, key=len)]


def _prefixes(kind: str) -> str:
    return ", ".join(p for p, k in DATA_SOURCES.items() if k == kind)


def score_sample(
    data_source: str,
    response: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    limits: SandboxLimits | None = None,
) -> Score:
    """Score one response with its details. ``extra_info`` is accepted for verl's signature and not
    used. Raises ``ValueError`` (``CodeTestsError`` for code) on an unknown data source or bad ground truth."""
    if reward_kind(data_source) == "math":
        if not isinstance(ground_truth, (str, int, float)) or str(ground_truth).strip() == "":
            raise ValueError(
                f"reward_model.ground_truth={ground_truth!r}: a math problem needs its answer as a string "
                "(LaTeX or plain, e.g. '\\frac{1}{2}')."
            )
        return Score(score_math(response, str(ground_truth)), {"answer": extract_boxed(response)})
    result = check_code(response, ground_truth, limits)
    return Score(float(result.passed), {"status": result.status, "groups": result.groups, "detail": result.detail})


def score_batch(
    items: Sequence[tuple[str, str, Any, dict | None]], limits: SandboxLimits | None = None, workers: int = 4
) -> list[Score]:
    """``score_sample`` of many (data_source, response, ground_truth, extra_info) items, in order:
    code in ``workers`` threads (each test is its own sandboxed process), math meanwhile in the
    calling thread (Math-Verify's time limit works only in the main thread)."""
    scores: list[Score | None] = [None] * len(items)
    with ThreadPoolExecutor(workers) as pool:
        futures = {
            i: pool.submit(score_sample, *item, limits=limits)
            for i, item in enumerate(items)
            if reward_kind(item[0]) == "code"
        }
        for i, item in enumerate(items):
            if i not in futures:
                scores[i] = score_sample(*item)
        for i, future in futures.items():
            scores[i] = future.result()
    return scores  # type: ignore[return-value]


def compute_score(data_source: str, response: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """The outcome reward of one response: 1.0 right (math) / all tests pass (code), else 0.0."""
    return score_sample(data_source, response, ground_truth, extra_info).value


__all__ = ["DATA_SOURCES", "CodeTestsError", "Score", "compute_score", "reward_kind", "score_batch", "score_sample"]
