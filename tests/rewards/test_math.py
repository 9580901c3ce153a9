"""Math answers: boxed extraction and Math-Verify equivalence on known right and wrong answers."""

from __future__ import annotations

import threading

import pytest

from megatron_opd.rewards.math import extract_boxed, math_equal, score_math


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1}, then \\boxed{ 2 } finally", "2"),
        (
            "nested \\boxed{\\left\\{ 1, \\sqrt{\\frac{2}{3}} \\right\\}}",
            "\\left\\{ 1, \\sqrt{\\frac{2}{3}} \\right\\}",
        ),
        ("escaped braces \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("no box here", None),
        ("\\boxed{12", None),  # cut off inside the answer
        ("\\boxed{1} then cut \\boxed{2", None),  # the last box is the answer, even if unclosed
        ("\\boxed{}", None),
        ("\\boxedx{3}", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("pred", "truth"),
    [
        ("204", "204"),
        ("204.0", "204"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "1/2"),
        ("\\tfrac{3}{4}", "\\frac34"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt2/2"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("(1,2]", "(1, 2]"),
        ("\\left(1, 2\\right]", "(1,2]"),
        ("[1,2)\\cup(3,4]", "[1,2) \\cup (3,4]"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
        ("x=3", "3"),
        ("90^\\circ", "90"),
        ("1,000", "1000"),
        ("x^2+2x+1", "(x+1)^2"),
        ("\\infty", "\\infty"),
        ("\\text{(B)}", "B"),
    ],
)
def test_math_equal_right(pred: str, truth: str) -> None:
    assert math_equal(pred, truth)


@pytest.mark.parametrize(
    ("pred", "truth"),
    [
        ("205", "204"),
        ("\\frac{1}{3}", "0.5"),
        ("(1,2)", "(1,2]"),
        ("[1,2]", "(1,2]"),
        ("\\{1,2,3\\}", "\\{1,2\\}"),
        ("x^2+1", "(x+1)^2"),
        ("-\\infty", "\\infty"),
        ("", "1"),
        ("\\text{(C)}", "B"),
    ],
)
def test_math_equal_wrong(pred: str, truth: str) -> None:
    assert not math_equal(pred, truth)


def test_score_math() -> None:
    assert score_math("Adding, 1/2 + 1/4 = \\boxed{\\dfrac{3}{4}}.", "0.75") == 1.0
    assert score_math("I think it is \\boxed{0.7}.", "0.75") == 0.0
    assert score_math("The answer is 0.75.", "0.75") == 0.0  # no boxed answer: no credit
    assert score_math("Then \\boxed{3} ... wait, \\boxed{4}", "3") == 0.0  # the last box counts
    assert score_math("\\boxed{(0, 1]}", "\\boxed{(0,1]}") == 1.0  # a boxed ground truth is unboxed


def test_math_equal_in_a_thread() -> None:
    """Math-Verify's signal-based timeout needs the main thread; in a thread it runs without one."""
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(math_equal("\\frac{2}{4}", "0.5")))
    thread.start()
    thread.join()
    assert results == [True]
