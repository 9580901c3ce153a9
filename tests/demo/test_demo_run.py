"""The README's main command: ``opd train configs/demo/cpu.yaml`` shows distillation working — held-out
accuracy of the student rises by at least 0.2 and closes at least half of the gap to the teacher — and
writes the summary, metrics and an exportable checkpoint; and it is deterministic: two runs give the same
numbers, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


# metrics.jsonl fields that measure wall-clock time; every other field is a function of the run's inputs
WALL_CLOCK_FIELDS = ("time", "perf/tokens_per_s")
WALL_CLOCK_PREFIX = "time/"


def train_demo(run: Path, *overrides: str) -> dict:
    """``opd train configs/demo/cpu.yaml`` into ``run``; its summary."""
    command = [sys.executable, "-m", "megatron_opd", "train", "configs/demo/cpu.yaml", f"run_dir={run}"]
    proc = subprocess.run(
        [*command, "logging.progress_bar=false", *overrides], cwd=REPO, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((run / "summary.json").read_text())


def metrics_without_wall_clock(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS and not k.startswith(WALL_CLOCK_PREFIX)}
        for r in records
    ]


def test_cpu_demo_learns(demo_assets: object, tmp_path: Path) -> None:
    run = tmp_path / "demo"
    summary = train_demo(run)
    before, after, teacher = summary["eval_before"], summary["eval_after"], summary["teacher_eval"]
    assert after - before >= 0.2, summary
    assert after - before >= 0.5 * (teacher - before), summary
    assert summary["steps"] == 30 and summary["wall_s"] > 0
    assert (run / "checkpoints" / "iter_0000030" / "COMPLETE").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 30


def test_short_demo_is_bit_identical_across_runs(demo_assets: object, tmp_path: Path) -> None:
    """Four steps with an evaluation, twice: every metric of every step and every accuracy equal, bit for bit
    (rollouts, scores, updates and evaluations depend only on the config, its seeds and the assets)."""
    short = ("trainer.steps=4", "trainer.eval_every=2", "trainer.save_every=0")
    first, second = train_demo(tmp_path / "a", *short), train_demo(tmp_path / "b", *short)
    a, b = metrics_without_wall_clock(tmp_path / "a"), metrics_without_wall_clock(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and "eval/accuracy" in a[1]
    assert a == b
    for key in ("eval_before", "eval_after", "teacher_eval"):
        assert first[key] == second[key], key
