"""``opd train`` end to end on CPU (Ray worker groups): a TP=2 student, an MoE teacher at EP=2 x DP=2
and the reference (ExOPD), the embedded rollout engine, evaluation, checkpoints.

- A run stopped after step 2 and resumed gives step 3 exactly as an uninterrupted run.
- The same run with rollouts from an SGLang-API server (``opd serve``) that gives its memory back
  after every rollout (``rollout.offload_when_idle``; released weights come back as zeros) trains
  exactly as the embedded engine: the weights are re-sent before every rollout.
- The final checkpoint converts to an HF model that samples what the trained student sampled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.rollout.sglang.launcher import ServerProcesses
from tests.rollout.conftest import serve_commands
from tests.tiny_runs import save_model, tokenizer_config, write_task_data
from tests.tolerance import FORWARD_ULPS, metric_atol

CONFIG = """
student:
  path: {root}/student
  parallel: {{tensor_model_parallel_size: 2}}
teachers:
  - name: default
    path: {root}/teacher
    parallel: {{expert_model_parallel_size: 2, data_parallel_size: 2}}
objective:
  name: exopd
data:
  train_files: [{root}/data/train.parquet]
  train_batch_size: 4
  max_prompt_length: 32
rollout:
  max_new_tokens: 6
optim:
  lr: 1.0e-3
trainer:
  steps: 3
  save_every: 1
  keep_last: 5
  max_tokens_per_microbatch: 64
eval:
  files: [{root}/data/val.parquet]
  max_new_tokens: 6
logging:
  progress_bar: false
  tensorboard: false
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    save_model(root / "student", tokenizer_config(), seed=1)
    save_model(root / "teacher", tokenizer_config(moe=True), seed=2)
    write_task_data(root)
    (root / "config.yaml").write_text(CONFIG.format(root=root))
    return root


def opd(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_opd", *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def same_steps(got: dict[int, dict], want: dict[int, dict], ulps: float) -> None:
    """Steps 1-3 agree to ``ulps`` fp32 ulps of each metric."""
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("train/loss", "train/grad_norm", "teacher/reverse_kl", "rollout/response_len"):
            tol = metric_atol(want[step][key], ulps)
            assert got[step][key] == pytest.approx(want[step][key], rel=0, abs=tol), (step, key)


@pytest.fixture(scope="module")
def runs(assets: Path) -> dict[str, Path]:
    full, resumed = assets / "run_full", assets / "run_resumed"
    opd("train", str(assets / "config.yaml"), f"run_dir={full}")
    opd("train", str(assets / "config.yaml"), f"run_dir={resumed}", "trainer.steps=2")
    opd("train", str(assets / "config.yaml"), f"run_dir={resumed}", "trainer.steps=3")
    with ServerProcesses(serve_commands(assets / "student", 1), assets / "server_logs").start(120) as server:
        served = assets / "run_served"
        overrides = [
            "rollout.engine=sglang",
            f"rollout.sglang.urls=[{server.urls[0]}]",
            "rollout.offload_when_idle=true",
        ]
        opd("train", str(assets / "config.yaml"), f"run_dir={served}", *overrides)
    return {"full": full, "resumed": resumed, "served": served}


@pytest.mark.slow
def test_run_outputs(runs: dict[str, Path]) -> None:
    run = runs["full"]
    summary = json.loads((run / "summary.json").read_text())
    assert {"steps", "eval_before", "eval_after", "teacher_eval", "wall_s"} <= summary.keys()
    assert summary["steps"] == 3 and 0.0 <= summary["eval_after"] <= 1.0
    m = metrics(run)
    assert sorted(m) == [1, 2, 3]
    for key in (
        "train/loss",
        "train/grad_norm",
        "teacher/reverse_kl",
        "student/entropy",
        "rollout/response_len",
        "support/topk_overlap",
        "time/rollout_s",
        "time/score_s",
        "time/train_s",
        "time/sync_s",
        "perf/tokens_per_s",
    ):
        assert key in m[3], key
    ckpts = run / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert all((ckpts / f"iter_000000{i}" / "COMPLETE").is_file() for i in (1, 2, 3))
    assert (ckpts / "hf" / "config.json").is_file() and (run / "config.yaml").is_file()


@pytest.mark.slow
def test_resume_continues_exactly(runs: dict[str, Path]) -> None:
    same_steps(metrics(runs["resumed"]), metrics(runs["full"]), ulps=8)  # the same computation, restored state


@pytest.mark.slow
def test_served_rollouts_with_memory_release_train_the_same(runs: dict[str, Path]) -> None:
    served = metrics(runs["served"])
    # served: the same tokens, scored and trained on as before; their rollout log-probs came through other batch
    # shapes (a forward pass's rounding) and enter the loss through the importance weights
    same_steps(served, metrics(runs["full"]), ulps=2 * FORWARD_ULPS)
    for step in (1, 2, 3):
        assert served[step]["rollout/memory_releases"] == step and served[step]["rollout/server_failures"] == 0
    summaries = [json.loads((runs[r] / "summary.json").read_text()) for r in ("full", "served")]
    assert summaries[1]["eval_after"] == summaries[0]["eval_after"]


@pytest.mark.slow
def test_checkpoint_exports_the_trained_student(runs: dict[str, Path], assets: Path, tmp_path: Path) -> None:
    run = runs["full"]
    opd("convert", "mcore-to-hf", "--mcore-dir", str(run / "checkpoints"), "--out", str(tmp_path / "hf"))
    out = tmp_path / "eval"
    opd(
        "eval",
        "--model",
        str(tmp_path / "hf"),
        "--data",
        str(assets / "data" / "val.parquet"),
        "--n",
        "1",
        "--max-new-tokens",
        "6",
        "--engine",
        "hf",
        "--out",
        str(out),
    )
    trained = [
        json.loads(line)["response"] for line in (run / "eval" / "final" / "samples.jsonl").read_text().splitlines()
    ]
    exported = [json.loads(line)["response"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert exported == trained
