"""The demo task: problems, disjoint splits, verl-schema parquet rows, the sloppy tutor."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq

from megatron_opd.demo.task import (
    DATA_SOURCE,
    Problem,
    TaskSpec,
    boxed,
    carryless_sum,
    split_problems,
    tutor,
    write_split,
)
from megatron_opd.rewards.math import score_math


def test_carryless_sum() -> None:
    assert carryless_sum(37, 48) == 75
    assert carryless_sum(95, 15) == 0
    assert carryless_sum(99, 99) == 88
    assert carryless_sum(12, 30) == 42 == 12 + 30
    assert carryless_sum(0, 0) == 0


def test_splits_are_disjoint_complete_and_deterministic() -> None:
    spec = TaskSpec()
    splits = split_problems(spec)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"test": spec.n_test, "val": spec.n_val, "train": 6975 - spec.n_test - spec.n_val}
    assert all(carryless_sum(p.a, p.b) != p.a + p.b for v in splits.values() for p in v)  # all need a carry
    assert len(split_problems(TaskSpec(carry_only=False))["train"]) == 10000 - spec.n_test - spec.n_val
    sets = {k: set(v) for k, v in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert split_problems(spec) == splits
    assert split_problems(TaskSpec(seed=7))["test"] != splits["test"]


def test_answers_are_checked_by_math_verify() -> None:
    p = Problem(37, 48)
    assert p.question == "37+48=" and p.answer == "85"
    assert score_math(boxed(p.answer), p.answer) == 1.0
    assert score_math(boxed(str(carryless_sum(37, 48))), p.answer) == 0.0


def test_tutor_drops_carries_at_the_given_rate() -> None:
    problems = [Problem(37, 48)] * 2000 + [Problem(12, 30)]
    rng = random.Random(0)
    answers = [tutor(problems, 0.8)(i, rng) for i in range(2000)]
    assert set(answers) == {boxed("85"), boxed("75")}
    assert 0.75 < answers.count(boxed("75")) / 2000 < 0.85
    assert tutor(problems, 0.8)(2000, rng) == boxed("42")  # no carry: nothing to drop
    assert {tutor(problems, 0.0)(i, rng) for i in range(100)} == {boxed("85")}


def test_parquet_rows_follow_the_verl_schema(tmp_path: Path) -> None:
    from megatron_opd.data import DataConfig, PromptDataset
    from megatron_opd.demo.tokenizer import build_tokenizer

    problems = split_problems(TaskSpec())["val"][:5]
    path = tmp_path / "val.parquet"
    write_split(path, problems, "val")
    rows = pq.read_table(path).to_pylist()
    assert rows[0] == {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": problems[0].question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": problems[0].answer},
        "extra_info": {"index": 0, "split": "val"},
    }
    assert [r["extra_info"]["index"] for r in rows] == list(range(5))
    data = PromptDataset(str(path), build_tokenizer(), DataConfig(train_files=[str(path)]), ["default"])
    assert [data[i].ground_truth for i in range(len(data))] == [p.answer for p in problems]
    assert data[0].data_source == DATA_SOURCE and data[0].teacher == "default"
