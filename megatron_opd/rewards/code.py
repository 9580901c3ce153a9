"""Code answers: the last ```python block of a response, judged by a problem's unit tests run in the sandbox.

Stdin/stdout tests (LiveCodeBench ``stdin``, APPS) run the program once per test, in order, and
stop at the first failure; output is compared as LiveCodeBench does: line by line after stripping,
and where a line differs, token by token as decimal numbers (``1.0`` matches ``1``). Function tests
(EvalPlus, LiveCodeBench ``functional``) run in one process that calls the function on every input;
the return values travel back to this process, which compares them (the program never sees the
expected outputs): Python equality, floats within ``rel 1e-7`` and ``abs atol`` (EvalPlus' rule,
``atol`` defaulting to 1e-6), and values made only of plain built-in types, so an object with a
rigged ``__eq__`` cannot pass.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import json
import math
import re
from typing import Any

from megatron_opd.rewards.code_tests import CallTests, CodeTestsError, StdioTests, parse_tests
from megatron_opd.rewards.sandbox import SandboxLimits, SandboxRun, run_calls, run_script
from megatron_opd.rewards.sandbox_child import decode_value

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")
_DEFAULT_ATOL = 1e-6
# SandboxRun.status -> CodeResult.status
_RUN_STATUS = {"error": "runtime_error", "timeout": "timeout", "memory": "memory", "output_limit": "output_limit"}


@dataclasses.dataclass
class CodeResult:
    """The verdict on one response. ``status``: ``passed``, ``no_code``, ``wrong_answer``,
    ``runtime_error``, ``timeout``, ``memory`` or ``output_limit`` (of the first failing test).
    ``groups``: pass/fail per test group (``base``/``plus`` for EvalPlus, else ``tests``)."""

    passed: bool
    status: str
    groups: dict[str, bool]
    detail: str = ""


def extract_code(response: str) -> str | None:
    """The body of the last complete ```python (or ```py / ```python3) block; failing that, of the
    last block with no language tag; None when there is neither."""
    blocks = _FENCE.findall(response)
    for tags in (_PYTHON_TAGS, ("",)):
        for tag, body in reversed(blocks):
            if tag.lower() in tags:
                return body
    return None


def stdout_matches(actual: str, expected: str) -> bool:
    """LiveCodeBench's stdout comparison: the same lines after stripping; a differing line still
    matches when its whitespace-separated tokens are equal, numbers compared as decimals."""
    got = actual.replace("\r\n", "\n").strip().split("\n")
    want = expected.replace("\r\n", "\n").strip().split("\n")
    if len(got) != len(want):
        return False
    for line, ref in zip(got, want):
        line, ref = line.strip(), ref.strip()
        if line == ref:
            continue
        tokens, ref_tokens = line.split(), ref.split()
        if len(tokens) != len(ref_tokens) or not all(map(_same_token, tokens, ref_tokens)):
            return False
    return True


def _same_token(token: str, ref: str) -> bool:
    if token == ref:
        return True
    try:
        return decimal.Decimal(token) == decimal.Decimal(ref)
    except decimal.InvalidOperation:
        return False


def values_equal(value: Any, expected: Any, atol: float = 0.0) -> bool:
    """Python equality of two plain values (as decoded from the sandbox), with floats compared at
    ``rel_tol=1e-7``, ``abs_tol=atol or 1e-6`` (EvalPlus), recursively inside lists, tuples and dicts."""
    if isinstance(value, float) or isinstance(expected, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, expected))
        if not numbers:
            return False
        if math.isnan(value) or math.isnan(expected):
            return math.isnan(value) and math.isnan(expected)
        return math.isclose(value, expected, rel_tol=1e-7, abs_tol=atol or _DEFAULT_ATOL)
    if type(value) is not type(expected) or not isinstance(value, (list, tuple, dict)):
        return bool(value == expected)
    if isinstance(value, dict):
        return value.keys() == expected.keys() and all(values_equal(value[k], expected[k], atol) for k in value)
    return len(value) == len(expected) and all(values_equal(v, e, atol) for v, e in zip(value, expected))


def _tuples_as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_tuples_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _tuples_as_lists(v) for k, v in value.items()}
    return value


def _output_matches(value: Any, expected: Any, tests: CallTests) -> bool:
    if tests.json_outputs:
        value = _tuples_as_lists(value)
    if values_equal(value, expected, tests.atol):
        return True
    return (
        tests.singleton_outputs
        and isinstance(expected, list)
        and len(expected) == 1
        and values_equal(value, expected[0], tests.atol)
    )


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else ""


def _check_stdio(code: str, tests: StdioTests, limits: SandboxLimits) -> CodeResult:
    for i, (stdin, expected) in enumerate(tests.cases):
        run = run_script(code, stdin, limits)
        if run.status != "ok":
            why = _last_line(run.stderr) or f"exit code {run.returncode}"
            return CodeResult(False, _RUN_STATUS[run.status], {"tests": False}, f"test {i}: {why}")
        if not stdout_matches(run.stdout, expected):
            detail = f"test {i}: expected {expected[:200]!r}, got {run.stdout[:200]!r}"
            return CodeResult(False, "wrong_answer", {"tests": False}, detail)
    return CodeResult(True, "passed", {"tests": True})


def _flat(inputs: dict[str, list[list]]) -> list[tuple[str, int, list]]:
    return [(group, i, args) for group, arg_lists in inputs.items() for i, args in enumerate(arg_lists)]


def _call_failure(run: SandboxRun, k: int) -> tuple[str, str] | None:
    """(status, message) when call ``k`` did not return a value, else None."""
    if k >= len(run.calls):
        return _RUN_STATUS.get(run.status, "runtime_error"), _last_line(run.stderr) or "not run"
    if run.calls[k].get("error") is None:
        return None
    error = str(run.calls[k]["error"])
    status = "timeout" if error.startswith("TimeoutError") else "memory" if error.startswith("MemoryError") else None
    return status or "runtime_error", error[:300]


@functools.lru_cache(maxsize=1024)
def _reference_outputs(reference: str, fn_name: str, inputs_json: str, limits: SandboxLimits) -> dict[str, list]:
    """The reference solution's return values on every input, by group (cached: the same problem is
    scored for every sample). A reference that fails is bad data: ``CodeTestsError``."""
    inputs = json.loads(inputs_json)
    flat = _flat(inputs)
    run = run_calls(reference, fn_name, [args for _, _, args in flat], limits)
    outputs: dict[str, list] = {group: [] for group in inputs}
    for k, (group, i, _) in enumerate(flat):
        failure = _call_failure(run, k)
        if failure:
            raise CodeTestsError(
                f"reward_model.ground_truth.canonical_solution: the reference fails on {group} input {i} "
                f"({failure[0]}: {failure[1]}). Fix: correct the reference or drop the input."
            )
        outputs[group].append(decode_value(run.calls[k]["value"]))
    return outputs


def expected_outputs(tests: CallTests, limits: SandboxLimits) -> dict[str, list]:
    """The expected return values by group: given, or the reference's (run once per problem and
    cached). ``CodeTestsError`` when the reference fails on an input."""
    if tests.expected is not None:
        return tests.expected
    return _reference_outputs(tests.reference or "", tests.fn_name, json.dumps(tests.inputs), limits)


def _check_calls(code: str, tests: CallTests, limits: SandboxLimits) -> CodeResult:
    expected = expected_outputs(tests, limits)
    flat = _flat(tests.inputs)
    run = run_calls(code, tests.fn_name, [args for _, _, args in flat], limits)
    groups = {group: True for group in tests.inputs}
    first: tuple[str, str] | None = None
    for k, (group, i, _) in enumerate(flat):
        failure = _call_failure(run, k)
        if failure is None:
            try:
                value = decode_value(run.calls[k]["value"])
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # not the harness's writing
                failure = ("wrong_answer", "malformed result")
            else:
                if not _output_matches(value, expected[group][i], tests):
                    failure = ("wrong_answer", f"expected {expected[group][i]!r:.200}, got {value!r:.200}")
        if failure:
            groups[group] = False
            where = f"test {i}" if group == "tests" else f"{group} test {i}"
            first = first or (failure[0], f"{where}: {failure[1]}")
    if first is None:
        return CodeResult(True, "passed", groups)
    return CodeResult(False, first[0], groups, first[1])


def check_code(response: str, ground_truth: str | dict, limits: SandboxLimits | None = None) -> CodeResult:
    """Run the response's code against the tests in ``ground_truth`` (see ``code_tests``).
    ``CodeTestsError`` when the ground truth is not a valid test set."""
    tests = parse_tests(ground_truth)
    limits = limits or SandboxLimits()
    code = extract_code(response)
    if code is None:
        groups = dict.fromkeys(tests.inputs if isinstance(tests, CallTests) else ("tests",), False)
        return CodeResult(False, "no_code", groups, "no ```python block in the response")
    if isinstance(tests, StdioTests):
        return _check_stdio(tests.prelude + code, tests, limits)
    return _check_calls(tests.prelude + code, tests, limits)


def score_code(response: str, ground_truth: str | dict, limits: SandboxLimits | None = None) -> float:
    """1.0 when the response's code passes every test (EvalPlus: base and plus), else 0.0."""
    return float(check_code(response, ground_truth, limits).passed)
