"""The README's main command: ``opd train configs/demo/cpu.yaml`` shows distillation working — held-out
accuracy of the student rises by at least 0.2 and closes at least half of the gap to the teacher — and
writes the summary, metrics and an exportable checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_cpu_demo_learns(demo_assets: object, tmp_path: Path) -> None:
    run = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_opd",
            "train",
            "configs/demo/cpu.yaml",
            f"run_dir={run}",
            "logging.progress_bar=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads((run / "summary.json").read_text())
    before, after, teacher = summary["eval_before"], summary["eval_after"], summary["teacher_eval"]
    assert after - before >= 0.2, summary
    assert after - before >= 0.5 * (teacher - before), summary
    assert summary["steps"] == 30 and summary["wall_s"] > 0
    assert (run / "checkpoints" / "iter_0000030" / "COMPLETE").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 30
