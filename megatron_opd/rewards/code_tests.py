"""Unit-test sets of code problems, read from ``reward_model.ground_truth`` (a JSON string or a dict).

Three layouts, recognised by their keys (each the real benchmark's own field names):

- **EvalPlus** (HumanEval+, MBPP+): ``entry_point``, ``canonical_solution`` (complete reference code
  defining the entry point: for HumanEval, ``prompt + canonical_solution``), ``base_input`` and
  ``plus_input`` (lists of argument lists), optional ``atol``. Expected outputs come from running the
  reference, as EvalPlus does. Groups ``base`` (HumanEval/MBPP) and ``plus`` (the + tests).
- **LiveCodeBench**: ``public_test_cases`` and ``private_test_cases`` (JSON lists of
  ``{"input", "output", "testtype"}``; the private ones may be LiveCodeBench's compressed string,
  base64 of zlib of a pickled JSON string), ``metadata`` (JSON with ``func_name`` for ``functional``
  tests). ``stdin`` tests feed ``input`` to the program and compare its stdout with ``output``;
  ``functional`` tests call ``Solution().func_name`` (or a module-level function) with one argument
  per line of ``input`` (JSON), compared to ``output`` (JSON).
- **APPS / TACO / CodeContests** (verl's ``prime_code``, Eurus-RL-Code): ``inputs``, ``outputs``,
  optional ``fn_name``: stdin/stdout pairs, or with ``fn_name`` argument lists and return values.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import zlib
from typing import Any


class CodeTestsError(ValueError):
    """A ground truth that is not a usable test set; the message names the field and the fix."""


# LiveCodeBench's and APPS' graders run every program after star-imports of these standard modules
# (``typing`` included, so ``List[int]`` in a LeetCode signature needs no import) and a higher
# recursion limit; solutions written for those benchmarks rely on it.
_PRELUDE_MODULES = (
    "string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random", "statistics",
    "itertools", "functools", "operator", "io", "sys", "json",
)  # fmt: skip
COMPETITIVE_PRELUDE = (
    "".join(f"from {m} import *\n" for m in (*_PRELUDE_MODULES, "builtins", "typing"))
    + "".join(f"import {m}\n" for m in _PRELUDE_MODULES)
    + "sys.setrecursionlimit(50000)\n"
)


@dataclasses.dataclass(frozen=True)
class StdioTests:
    """Programs reading stdin, judged on their stdout: ``cases`` of (stdin, expected stdout).
    ``prelude``: code run before the program (``COMPETITIVE_PRELUDE`` or nothing)."""

    cases: tuple[tuple[str, str], ...]
    prelude: str = ""


@dataclasses.dataclass(frozen=True)
class CallTests:
    """A function called on argument lists, judged on its return values.

    ``inputs``: group name -> argument lists, groups in test order. ``expected``: group name ->
    return values, or None to take them from running ``reference``. ``json_outputs``: the expected
    values came from JSON, so a returned tuple compares as a list; ``singleton_outputs``: APPS'
    convention where ``[x]`` also accepts a returned ``x``. ``prelude``: as for ``StdioTests``.
    """

    fn_name: str
    inputs: dict[str, list[list]]
    expected: dict[str, list] | None = None
    reference: str | None = None
    atol: float = 0.0
    json_outputs: bool = False
    singleton_outputs: bool = False
    prelude: str = ""


_EVALPLUS_KEYS = ("entry_point", "canonical_solution", "base_input")
_LCB_KEYS = ("public_test_cases", "private_test_cases")
_APPS_KEYS = ("inputs", "outputs")


def parse_tests(ground_truth: str | dict) -> StdioTests | CallTests:
    """The test set in ``ground_truth``; ``CodeTestsError`` naming the field when it is malformed."""
    spec = _json(ground_truth, "reward_model.ground_truth") if isinstance(ground_truth, str) else ground_truth
    if not isinstance(spec, dict):
        raise CodeTestsError(
            f"reward_model.ground_truth: a code problem's ground truth must be a JSON object of tests, got {type(spec).__name__}."
        )
    if any(k in spec for k in ("base_input", "plus_input")):
        return _evalplus(spec)
    if any(k in spec for k in _LCB_KEYS):
        return _livecodebench(spec)
    if any(k in spec for k in _APPS_KEYS):
        return _apps(spec)
    raise CodeTestsError(
        f"reward_model.ground_truth: not a code test set (keys: {sorted(spec)}). Fix: give EvalPlus fields "
        f"({', '.join(_EVALPLUS_KEYS)}, plus_input), LiveCodeBench fields ({', '.join(_LCB_KEYS)}, metadata) "
        f"or APPS fields ({', '.join(_APPS_KEYS)}[, fn_name])."
    )


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CodeTestsError(f"{field}: not valid JSON ({e}).") from e


def _require(spec: dict, field: str, kind: type, what: str, where: str = "reward_model.ground_truth") -> Any:
    if spec.get(field) is None:
        raise CodeTestsError(f"{where}.{field}: missing. Fix: give {what}.")
    if not isinstance(spec[field], kind):
        raise CodeTestsError(f"{where}.{field}: expected {what}, got {type(spec[field]).__name__}.")
    return spec[field]


def _argument_lists(values: Any, field: str) -> list[list]:
    if not isinstance(values, list) or not all(isinstance(v, list) for v in values):
        raise CodeTestsError(
            f"reward_model.ground_truth.{field}: expected a list of argument lists, e.g. [[1, 2], [3, 4]]."
        )
    return values


def _evalplus(spec: dict) -> CallTests:
    fn_name = _require(spec, "entry_point", str, "the name of the function under test")
    reference = _require(spec, "canonical_solution", str, "complete reference code defining the entry point")
    base = _argument_lists(_require(spec, "base_input", list, "a list of argument lists"), "base_input")
    plus = _argument_lists(spec.get("plus_input") or [], "plus_input")
    atol = spec.get("atol") or 0.0
    if not isinstance(atol, (int, float)) or atol < 0:
        raise CodeTestsError(f"reward_model.ground_truth.atol={atol!r}: must be a number >= 0.")
    if not base:
        raise CodeTestsError("reward_model.ground_truth.base_input: empty. Fix: give at least one test input.")
    return CallTests(fn_name, {"base": base, "plus": plus}, reference=reference, atol=float(atol))


class _StringsOnly(pickle.Unpickler):
    """Unpickles plain data only: LiveCodeBench's private tests are a pickled str; a pickle that
    names any class or function (the way pickles run code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise CodeTestsError(
            f"reward_model.ground_truth.private_test_cases: the compressed tests reference {module}.{name}; "
            "only plain data is accepted."
        )


def _lcb_cases(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                raw = zlib.decompress(base64.b64decode(value))
                value = json.loads(_StringsOnly(io.BytesIO(raw)).load())
            except (ValueError, zlib.error, pickle.UnpicklingError, EOFError, TypeError) as e:
                raise CodeTestsError(
                    f"reward_model.ground_truth.{field}: neither JSON nor LiveCodeBench's compressed form ({e})."
                ) from e
    if not isinstance(value, list) or not all(isinstance(c, dict) and {"input", "output"} <= c.keys() for c in value):
        raise CodeTestsError(
            f'reward_model.ground_truth.{field}: expected a list of {{"input", "output", "testtype"}} objects.'
        )
    return value


def _livecodebench(spec: dict) -> StdioTests | CallTests:
    cases = _lcb_cases(spec.get("public_test_cases") or [], "public_test_cases")
    cases += _lcb_cases(spec.get("private_test_cases") or [], "private_test_cases")
    if not cases:
        raise CodeTestsError("reward_model.ground_truth: no LiveCodeBench test cases (public and private are empty).")
    types = {c.get("testtype", "stdin") for c in cases}
    if types == {"stdin"}:
        return StdioTests(tuple((c["input"], c["output"]) for c in cases), COMPETITIVE_PRELUDE)
    if types != {"functional"}:
        raise CodeTestsError(
            f"reward_model.ground_truth: testtype {sorted(types)}: use all 'stdin' or all 'functional' in one problem."
        )
    metadata = spec.get("metadata") or {}
    metadata = _json(metadata, "reward_model.ground_truth.metadata") if isinstance(metadata, str) else metadata
    if not isinstance(metadata, dict):
        raise CodeTestsError('reward_model.ground_truth.metadata: expected a JSON object like {"func_name": "..."}.')
    fn_name = _require(
        metadata,
        "func_name",
        str,
        "the name of the function functional tests call",
        "reward_model.ground_truth.metadata",
    )
    try:
        inputs = [[json.loads(line) for line in c["input"].split("\n") if line.strip()] for c in cases]
        expected = [json.loads(c["output"]) for c in cases]
    except json.JSONDecodeError as e:
        raise CodeTestsError(
            f"reward_model.ground_truth: a functional test's input or output is not JSON ({e}); "
            "functional tests give one JSON argument per line."
        ) from e
    return CallTests(
        fn_name, {"tests": inputs}, expected={"tests": expected}, json_outputs=True, prelude=COMPETITIVE_PRELUDE
    )


def _apps(spec: dict) -> StdioTests | CallTests:
    inputs = _require(spec, "inputs", list, "a list of test inputs")
    outputs = _require(spec, "outputs", list, "a list of expected outputs")
    if len(inputs) != len(outputs) or not inputs:
        raise CodeTestsError(
            f"reward_model.ground_truth: {len(inputs)} inputs and {len(outputs)} outputs; "
            "give the same, non-zero number of each."
        )
    fn_name = spec.get("fn_name")
    if fn_name:
        args = _argument_lists(inputs, "inputs")
        return CallTests(
            fn_name,
            {"tests": args},
            expected={"tests": outputs},
            json_outputs=True,
            singleton_outputs=True,
            prelude=COMPETITIVE_PRELUDE,
        )
    lines = [("\n".join(map(str, v)) if isinstance(v, list) else str(v)) for v in (*inputs, *outputs)]
    return StdioTests(tuple(zip(lines[: len(inputs)], lines[len(inputs) :])), COMPETITIVE_PRELUDE)
