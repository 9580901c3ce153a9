"""Outcomes of the selftest's checks, as a table and as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Literal

Status = Literal["PASS", "FAIL", "SKIP"]


class Skip(Exception):
    """Raised by a check that cannot run here; the message says why."""


@dataclasses.dataclass
class Outcome:
    name: str
    status: Status
    detail: str  # what was measured, or why it failed / was skipped
    seconds: float
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


Check = Callable[[], tuple[str, dict[str, Any]]]  # returns (detail, data); raises AssertionError / Skip


def run_check(name: str, check: Check) -> Outcome:
    """Run one check: PASS with its detail, SKIP on :class:`Skip`, FAIL on anything else raised."""
    t0 = time.perf_counter()
    try:
        detail, data = check()
        status: Status = "PASS"
    except Skip as e:
        detail, data, status = str(e), {}, "SKIP"
    except Exception as e:  # a failed check is reported, the next one still runs
        last = traceback.extract_tb(e.__traceback__)[-1]
        detail = f"{type(e).__name__}: {e} ({os.path.basename(last.filename)}:{last.lineno})"
        data, status = {"traceback": traceback.format_exc()}, "FAIL"
    return Outcome(name, status, detail, time.perf_counter() - t0, data)


def table(outcomes: list[Outcome]) -> Iterator[str]:
    """Rows ``STATUS  name  seconds  detail`` and a closing count."""
    width = max(len(o.name) for o in outcomes)
    for o in outcomes:
        yield f"{o.status:<4}  {o.name:<{width}}  {o.seconds:6.1f}s  {o.detail}"
    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "SKIP")}
    yield f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"


def write_json(path: str, environment: dict[str, Any], outcomes: list[Outcome]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    record = {
        "environment": environment,
        "checks": [dataclasses.asdict(o) for o in outcomes],
        "passed": sum(o.status == "PASS" for o in outcomes),
        "failed": sum(o.status == "FAIL" for o in outcomes),
        "skipped": sum(o.status == "SKIP" for o in outcomes),
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
