"""Code answers: extraction, the three test layouts, judging (right, wrong, crashing, looping, hacking)."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from megatron_opd.rewards.code import check_code, extract_code, score_code, stdout_matches, values_equal
from megatron_opd.rewards.code_tests import COMPETITIVE_PRELUDE, CallTests, CodeTestsError, StdioTests, parse_tests
from megatron_opd.rewards.sandbox import SandboxLimits

FAST = SandboxLimits(timeout_s=1.0, total_timeout_s=4.0, memory_mb=512)

EVALPLUS = {
    "task_id": "HumanEval/x",
    "entry_point": "mean_abs",
    "canonical_solution": "def mean_abs(xs):\n    return sum(abs(x) for x in xs) / len(xs)\n",
    "base_input": [[[1, -1]], [[2.5]]],
    "plus_input": [[[-3, 1, 2]], [[1e-9, 3]]],
    "atol": 0,
}
LCB_STDIN = {
    "public_test_cases": json.dumps([{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"}]),
    # LiveCodeBench ships private tests as base64(zlib(pickle(json string)))
    "private_test_cases": base64.b64encode(
        zlib.compress(pickle.dumps(json.dumps([{"input": "2\n-5 5\n", "output": "0\n", "testtype": "stdin"}])))
    ).decode(),
    "metadata": "{}",
}
LCB_FUNCTIONAL = {
    "public_test_cases": json.dumps([{"input": "[1, 2]\n3", "output": "[4, 5]", "testtype": "functional"}]),
    "private_test_cases": json.dumps([{"input": "[]\n1", "output": "[]", "testtype": "functional"}]),
    "metadata": json.dumps({"func_name": "addAll"}),
}


def answer(code: str) -> str:
    return f"Let me think.\n```python\n{code}\n```\nDone."


# --- extraction and comparison ------------------------------------------------------------------


def test_extract_code() -> None:
    text = "```python\nfirst\n```\ntext\n```py\nsecond\n```\n```text\nnot code\n```"
    assert extract_code(text) == "second\n"
    assert extract_code("```\nuntagged\n```") == "untagged\n"
    assert extract_code("```python\nx = 1\n```\n```\nuntagged\n```") == "x = 1\n"  # a python block wins
    assert extract_code("no code") is None
    assert extract_code("```python\ncut off") is None


def test_stdout_matches() -> None:
    assert stdout_matches("1 2\n3\n\n", "1 2\n3")
    assert stdout_matches("1.0  2\r\n", "1 2.00")
    assert not stdout_matches("1 2\n", "1 2\n3")
    assert not stdout_matches("1 3\n", "1 2\n")
    assert not stdout_matches("yes", "YES")


def test_values_equal() -> None:
    assert values_equal(0.1 + 0.2, 0.3)
    assert values_equal([1, (2.0, 3)], [1, (2, 3)])
    assert not values_equal([1, 2], (1, 2))
    assert not values_equal(0.31, 0.3)
    assert values_equal(0.31, 0.3, atol=0.02)
    assert values_equal(float("nan"), float("nan"))
    assert not values_equal("1", 1)
    assert values_equal({"a": [1.0]}, {"a": [1]})


# --- layouts ------------------------------------------------------------------------------------


def test_parse_layouts() -> None:
    evalplus = parse_tests(json.dumps(EVALPLUS))
    assert isinstance(evalplus, CallTests) and list(evalplus.inputs) == ["base", "plus"]
    assert evalplus.expected is None and evalplus.reference == EVALPLUS["canonical_solution"]
    assert evalplus.prelude == ""  # EvalPlus runs the code as written
    stdin = parse_tests(LCB_STDIN)
    assert stdin == StdioTests((("3\n1 2 3\n", "6\n"), ("2\n-5 5\n", "0\n")), COMPETITIVE_PRELUDE)
    functional = parse_tests(LCB_FUNCTIONAL)
    assert isinstance(functional, CallTests)
    assert functional.inputs == {"tests": [[[1, 2], 3], [[], 1]]} and functional.expected == {"tests": [[4, 5], []]}
    apps = parse_tests({"inputs": ["1\n", ["2", "3"]], "outputs": ["1\n", "5\n"]})
    assert apps == StdioTests((("1\n", "1\n"), ("2\n3", "5\n")), COMPETITIVE_PRELUDE)
    apps_call = parse_tests({"inputs": [[1, 2]], "outputs": [[3]], "fn_name": "add"})
    assert isinstance(apps_call, CallTests) and apps_call.singleton_outputs


@pytest.mark.parametrize(
    ("ground_truth", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"tests": []}, "not a code test set"),
        ({**EVALPLUS, "entry_point": None}, "entry_point: missing"),
        ({**EVALPLUS, "base_input": [1, 2]}, "base_input: expected a list of argument lists"),
        ({**EVALPLUS, "base_input": []}, "base_input: empty"),
        ({**EVALPLUS, "atol": -1}, "atol=-1"),
        ({**LCB_FUNCTIONAL, "metadata": "{}"}, "metadata.func_name: missing"),
        ({"public_test_cases": "garbage!", "private_test_cases": ""}, "public_test_cases: neither JSON"),
        ({"public_test_cases": "[]", "private_test_cases": "[]"}, "no LiveCodeBench test cases"),
        ({"inputs": ["1"], "outputs": []}, "1 inputs and 0 outputs"),
    ],
)
def test_bad_ground_truth(ground_truth: str | dict, message: str) -> None:
    with pytest.raises(CodeTestsError, match=message):
        parse_tests(ground_truth if isinstance(ground_truth, str) else json.dumps(ground_truth))


def test_compressed_tests_refuse_code_in_pickles() -> None:
    class Evil:
        def __reduce__(self):  # unpickling would call print: a stand-in for running code
            return (print, ("pwned",))

    payload = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(CodeTestsError, match="only plain data"):
        parse_tests({"public_test_cases": "[]", "private_test_cases": payload})


# --- judging ------------------------------------------------------------------------------------


def test_evalplus_base_and_plus() -> None:
    right = "def mean_abs(xs):\n    return sum(map(abs, xs)) / len(xs)"
    result = check_code(answer(right), EVALPLUS, FAST)
    assert (result.passed, result.status, result.groups) == (True, "passed", {"base": True, "plus": True})
    base_only = "def mean_abs(xs):\n    return sum(map(abs, xs)) / len(xs) if len(xs) < 3 else 0.0"
    result = check_code(answer(base_only), EVALPLUS, FAST)
    assert (result.passed, result.status, result.groups) == (False, "wrong_answer", {"base": True, "plus": False})
    assert result.detail.startswith("plus test 0")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("def mean_abs(xs):\n    return 0", "wrong_answer"),
        ("def mean_abs(xs):\n    return xs[5]", "runtime_error"),
        ("def mean_abs(xs):\n    while True:\n        pass", "timeout"),
        ("def mean_abs(xs):\n    return [0] * 10**10", "memory"),
        (
            "import urllib.request\ndef mean_abs(xs):\n    return urllib.request.urlopen('http://1.1.1.1').read()",
            "runtime_error",
        ),
        ("def other(xs):\n    return 1", "runtime_error"),
        ("def mean_abs(xs:\n", "runtime_error"),
    ],
)
def test_evalplus_failures(code: str, status: str) -> None:
    result = check_code(answer(code), EVALPLUS, FAST)
    assert not result.passed and result.groups == {"base": False, "plus": False}
    assert result.status == status


def test_rigged_equality_does_not_pass() -> None:
    """An object whose ``__eq__`` always says yes (a known reward hack) comes back as its repr."""
    hack = "class Any(float):\n    def __eq__(self, other):\n        return True\ndef mean_abs(xs):\n    return Any()"
    assert score_code(answer(hack), EVALPLUS, FAST) == 0.0


def test_livecodebench_stdin_and_functional() -> None:
    right = "input()\nprint(sum(map(int, input().split())))"
    assert check_code(answer(right), LCB_STDIN, FAST).passed
    wrong = "input()\nprint(6)"  # passes the public test, fails the private one
    result = check_code(answer(wrong), LCB_STDIN, FAST)
    assert (result.status, result.detail[:6]) == ("wrong_answer", "test 1")
    crash = check_code(answer("raise SystemExit(2)"), LCB_STDIN, FAST)
    assert (crash.status, crash.detail) == ("runtime_error", "test 0: exit code 2")
    loop = check_code(answer("while True:\n    pass"), LCB_STDIN, FAST)
    assert loop.status == "timeout"
    method = "class Solution:\n    def addAll(self, nums, k):\n        return tuple(x + k for x in nums)"
    assert check_code(answer(method), LCB_FUNCTIONAL, FAST).passed  # a tuple matches a JSON list
    assert not check_code(answer(method.replace("x + k", "x")), LCB_FUNCTIONAL, FAST).passed


def test_livecodebench_programs_get_the_standard_imports() -> None:
    """LeetCode signatures use ``List`` and solutions use ``Counter``/``gcd`` without importing them."""
    code = "class Solution:\n    def addAll(self, nums: List[int], k: int) -> List[int]:\n        return [x + k for x in nums]"
    assert check_code(answer(code), LCB_FUNCTIONAL, FAST).passed
    stdin = "input()\nprint(sum(Counter(map(int, input().split())).elements()) + gcd(0, 0))"
    assert check_code(answer(stdin), LCB_STDIN, FAST).passed


def test_apps_call_accepts_the_singleton_convention() -> None:
    tests = {"inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]], "fn_name": "add"}
    assert score_code(answer("def add(a, b):\n    return a + b"), tests, FAST) == 1.0
    assert score_code(answer("def add(a, b):\n    return [a + b]"), tests, FAST) == 1.0
    assert score_code(answer("def add(a, b):\n    return a * b"), tests, FAST) == 0.0


def test_no_code_block() -> None:
    result = check_code("I cannot solve this.", LCB_STDIN, FAST)
    assert (result.passed, result.status, result.groups) == (False, "no_code", {"tests": False})


def test_failing_reference_is_bad_data() -> None:
    broken = {**EVALPLUS, "canonical_solution": "def mean_abs(xs):\n    return 1 / 0\n"}
    with pytest.raises(CodeTestsError, match="canonical_solution: the reference fails on base input 0"):
        check_code(answer("def mean_abs(xs):\n    return 1"), broken, FAST)
