"""Math answers: the last ``\\boxed{...}`` of a response, compared to the ground truth with Math-Verify.

Math-Verify (the verifier the G-OPD paper uses) parses both sides to SymPy and compares them, so
LaTeX variants (``\\dfrac12`` / ``1/2`` / ``0.5``), intervals, sets, equations (``x=3`` vs ``3``),
units and percent signs are judged equal when they mean the same. Its time limits use
``signal.alarm``, which only works in the main thread; elsewhere (a scoring thread pool) parsing and
comparison run without a time limit.
"""

from __future__ import annotations

import re
import threading

_BOX_PATTERN = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_TIMEOUT_S = 5


def _boxed_contents(text: str, start: int) -> str | None:
    """The argument of the box command ending at ``start``: ``{...}`` with nested braces, or
    ``\\boxed 5`` (one whitespace-delimited token); None when unbalanced or empty."""
    if text.startswith("{", start):
        depth = 0
        for i in range(start, len(text)):
            if text[i] == "{" and text[i - 1] != "\\":
                depth += 1
            elif text[i] == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start + 1 : i]
        return None
    if start < len(text) and text[start] == " ":
        match = re.match(r" +([^\s$]+)", text[start:])
        return match.group(1) if match else None
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (nested braces kept,
    surrounding whitespace stripped), or None when there is none, or the last one is empty or not
    closed (a response cut off inside its answer has no answer)."""
    matches = list(_BOX_PATTERN.finditer(text))
    if not matches:
        return None
    content = _boxed_contents(text, matches[-1].end())
    if content is None or not content.strip():
        return None
    return content.strip()


def _timeout() -> int | None:
    """Math-Verify's time limit: ``signal.alarm`` works only in the main thread."""
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(latex: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse("\\boxed{" + latex + "}", extraction_config=config, parsing_timeout=_timeout())


def math_equal(pred: str, ground_truth: str) -> bool:
    """Whether the answer ``pred`` equals ``ground_truth`` (both LaTeX or plain, without ``\\boxed``)
    by Math-Verify; a ground truth written as ``\\boxed{...}`` is unboxed first. An answer that cannot
    be parsed, or a comparison that times out, is not equal."""
    from math_verify import verify

    gold, answer = _parse(extract_boxed(ground_truth) or ground_truth), _parse(pred)
    if not gold or not answer:
        return False
    return bool(verify(gold, answer, timeout_seconds=_timeout()))


def score_math(response: str, ground_truth: str) -> float:
    """1.0 when the response's last boxed answer equals ``ground_truth``, else 0.0 (no boxed answer: 0)."""
    pred = extract_boxed(response)
    return float(pred is not None and math_equal(pred, str(ground_truth)))
