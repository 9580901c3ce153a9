"""``compute_score``: routing by data source (verl's convention) and clear errors."""

from __future__ import annotations

import json

import pytest

from megatron_opd.rewards import compute_score, reward_kind, score_batch, score_sample


@pytest.mark.parametrize(
    ("data_source", "kind"),
    [
        ("aime24", "math"),
        ("AIME2025", "math"),
        ("hmmt25_feb", "math"),
        ("lighteval/MATH", "math"),
        ("math", "math"),
        ("humanevalplus", "code"),
        ("mbpp_plus", "code"),
        ("livecodebench_v6", "code"),
        ("codecontests", "code"),
        ("code", "code"),
    ],
)
def test_reward_kind(data_source: str, kind: str) -> None:
    assert reward_kind(data_source) == kind


def test_unknown_data_source_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"data_source='gpqa'.*math aime, amc.*code humaneval"):
        compute_score("gpqa", "\\boxed{A}", "A")


def test_math_scores() -> None:
    assert compute_score("aime24", "so \\boxed{204}", "204") == 1.0
    assert compute_score("aime24", "so \\boxed{203}", "204") == 0.0
    assert compute_score("math", "\\boxed{\\frac{3}{2}}", 1.5) == 1.0  # a numeric ground truth from parquet
    assert score_sample("aime24", "\\boxed{7}", "7").details == {"answer": "7"}
    with pytest.raises(ValueError, match=r"reward_model\.ground_truth=None"):
        compute_score("aime24", "\\boxed{1}", None)


def test_code_scores_apps_stdin_tests() -> None:
    tests = json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]})
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert compute_score("code", right, tests) == 1.0
    assert compute_score("code", right.replace("a + b", "a * b"), tests) == 0.0
    details = score_sample("code", right.replace("a + b", "a * b"), tests).details
    assert details["status"] == "wrong_answer" and details["groups"] == {"tests": False}


def test_score_batch_keeps_the_order_of_mixed_items() -> None:
    tests = json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]})
    items = [
        ("code", "```python\nprint(int(input()) * 2)\n```", tests, None),
        ("aime24", "\\boxed{5}", "5", None),
        ("code", "```python\nprint(3)\n```", tests, None),
        ("math", "\\boxed{1/2}", "0.4", None),
    ]
    assert [s.value for s in score_batch(items, workers=2)] == [1.0, 1.0, 0.0, 0.0]
