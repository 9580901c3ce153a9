"""``tools/gpu_loop.py`` (the one-GPU loop of ``tools/gpu_session.sh``) at tiny scale on CPU: the real
``opd train`` path with random-weight models, and its per-phase record."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gpu_loop():
    spec = importlib.util.spec_from_file_location("gpu_loop", REPO / "tools" / "gpu_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_time_is_the_gap_before_the_next_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    phases = {"time/rollout_s": 2.0, "time/score_s": 1.0, "time/train_s": 3.0, "time/sync_s": 0.5}
    lines = [
        {"step": 1, "time": 100.0, "time/step_s": 6.5, "perf/tokens": 8000.0, "train/loss": 0.1, **phases},
        {"step": 2, "time": 110.0, "time/step_s": 6.5, "perf/tokens": 8100.0, "train/loss": 0.2, **phases},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    tracker = run / "checkpoints" / "latest_checkpointed_iteration.txt"
    tracker.write_text("2")
    os.utime(tracker, (113.0, 113.0))
    steps = _gpu_loop().step_phases(run)
    assert [s["checkpoint_s"] for s in steps] == [3.5, 3.0]  # 110 - 100 - 6.5; 113 - 110
    assert steps[0]["rollout_s"] == 2.0 and steps[1]["tokens"] == 8100


@pytest.mark.slow
def test_tiny_loop_runs_and_records_every_phase(demo_assets, tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    args = ["--tiny", "--steps", "2", "--prompts", "8", "--response-tokens", "24", "--max-tokens-per-microbatch", "256"]
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "gpu_loop.py"),
            "--work-dir",
            str(tmp_path / "work"),
            "--results",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [s["step"] for s in record["steps"]] == [1, 2]
    for s in record["steps"]:
        assert s["tokens"] > 8 * 24 // 2 and all(
            s[f"{p}_s"] >= 0 for p in ("rollout", "score", "train", "sync", "checkpoint")
        )
    assert record["host_peak_bytes"] > 0 and record["teacher"]["layers"] == 2
    assert "| step | tokens | rollout s |" in run.stdout
