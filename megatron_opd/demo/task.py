"""The demo's verifiable task: additions that need a carry (``37+48=`` -> ``\\boxed{85}``), in disjoint splits.

Every ordered pair ``(a, b)`` with ``0 <= a, b <= max_operand`` whose sum needs at least one carry is one
problem (6975 of the 10000 pairs for two digits); a seeded shuffle assigns each to exactly one of test /
val / train. Rows follow verl's parquet schema (see ``megatron_opd.data``).

The weak student learns from a *sloppy tutor* who forgets to carry: with probability ``carry_drop`` a
training answer is the digit-wise sum without carries (``37+48`` -> ``75``). The student ends up preferring
the carry-less answer while knowing the right one: a systematic misconception that the teacher's
token-level feedback corrects within a few dozen steps.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_SOURCE = "demo_arith"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One addition problem ``a + b``."""

    a: int
    b: int

    @property
    def question(self) -> str:
        """The user message (kept short: every prompt token costs CPU time)."""
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        """The ground truth math-verify compares with the ``\\boxed{}`` content."""
        return str(self.a + self.b)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What problems exist and how they are split. Part of the build recipe (changing it rebuilds).
    ``carry_only``: keep only the sums that need a carry (the skill the demo's student lacks)."""

    max_operand: int = 99
    carry_only: bool = True
    n_val: int = 256
    n_test: int = 512
    seed: int = 1234


def boxed(answer: str) -> str:
    """The assistant's answer text (the EOS ``<|im_end|>`` follows it)."""
    return f"\\boxed{{{answer}}}"


def carryless_sum(a: int, b: int) -> int:
    """Digit-wise sum with every carry dropped: ``carryless_sum(37, 48) == 75``."""
    total, place = 0, 1
    while a or b:
        total += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return total


def split_problems(spec: TaskSpec) -> dict[str, list[Problem]]:
    """Disjoint ``train`` / ``val`` / ``test`` lists of problems, deterministic in ``spec``."""
    problems = [Problem(a, b) for a in range(spec.max_operand + 1) for b in range(spec.max_operand + 1)]
    if spec.carry_only:
        problems = [p for p in problems if carryless_sum(p.a, p.b) != p.a + p.b]
    random.Random(spec.seed).shuffle(problems)
    n_test, n_val = spec.n_test, spec.n_val
    if n_test + n_val >= len(problems):
        raise ValueError(f"n_test + n_val = {n_test + n_val} leaves no training problems out of {len(problems)}")
    return {
        "test": problems[:n_test],
        "val": problems[n_test : n_test + n_val],
        "train": problems[n_test + n_val :],
    }


def tutor(problems: list[Problem], carry_drop: float) -> Callable[[int, random.Random], str]:
    """A tutor answering problem ``i`` in ``\\boxed{}``: correctly, or with probability ``carry_drop`` (drawn
    afresh on every call) with the carry-less sum."""

    def answer(i: int, rng: random.Random) -> str:
        p = problems[i]
        if carry_drop > 0 and rng.random() < carry_drop:
            return boxed(str(carryless_sum(p.a, p.b)))
        return boxed(p.answer)

    return answer


def verl_row(problem: Problem, index: int, split: str) -> dict[str, Any]:
    """One row in verl's schema: chat-message prompt, data source, rule-based ground truth, extra info."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": problem.question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": problem.answer},
        "extra_info": {"index": index, "split": split},
    }


def write_split(path: str | Path, problems: list[Problem], split: str) -> None:
    """Write ``problems`` as a verl-schema parquet file at ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [verl_row(p, i, split) for i, p in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(rows), str(path))
