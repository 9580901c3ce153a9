"""``trainer.max_staleness`` end to end on CPU, the engine in its own process (``opd serve``), the teachers on
their own workers (``trainer.colocate=false``: they score a batch ahead while the student trains).

- ``sync``: k = 0, steps 1-3, its own server.
- ``async``: k = 1 on another server; its driver is SIGKILLed after the update of step 3 and resumed.
- ``sync_from_2``: k = 0 from a copy of the async run's checkpoint 2 (the synchronous rule for step 3).

Step 1 of both modes is the same computation (version 0 samples it); later async steps learn from tokens one
version old, recorded per token, and the rollout correction sees the staleness; the resumed step 3 regenerates
its batch from checkpoint 2's weights, exactly as the synchronous rule from that checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.loader import load_config
from megatron_opd.rollout.sglang.launcher import ServerProcesses
from tests.reliability.conftest import RunResult, opd_in_process, opd_subprocess, ray_address  # noqa: F401
from tests.rollout.conftest import serve_commands
from tests.tiny_runs import save_model, tokenizer_config, write_task_data
from tests.tolerance import FORWARD_ULPS, metric_atol

KEYS = ("train/loss", "train/grad_norm", "teacher/reverse_kl", "rollout/response_len")
CONFIG = """
student:
  path: {root}/student
teachers:
  - name: default
    path: {root}/teacher
objective:
  name: opd
data:
  train_files: [{root}/data/train.parquet]
  train_batch_size: 4
  max_prompt_length: 32
rollout:
  engine: sglang
  max_new_tokens: 6
  batch_size: 2
optim:
  lr: 3.0e-3
trainer:
  steps: 3
  save_every: 1
  keep_last: 5
  max_tokens_per_microbatch: 64
  eval_before: false
  colocate: false
  group_timeout_s: 120
logging:
  progress_bar: false
  tensorboard: false
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("async")
    save_model(root / "student", tokenizer_config(), seed=1)
    save_model(root / "teacher", tokenizer_config(), seed=2)
    write_task_data(root)
    (root / "config.yaml").write_text(CONFIG.format(root=root))
    return root


@pytest.fixture(scope="module")
def servers(assets: Path) -> Iterator[list[str]]:
    """Two ``opd serve`` processes on the student: a fresh run expects its engine at the initial weights."""
    with ServerProcesses(serve_commands(assets / "student", 2), assets / "server_logs").start(120) as procs:
        yield procs.urls


def engine(url: str) -> list[str]:
    return [f"rollout.sglang.urls=[{url}]"]


@pytest.fixture(scope="module")
def runs(assets: Path, servers: list[str], ray_address: str) -> dict[str, RunResult]:  # noqa: F811
    config = assets / "config.yaml"
    out = {"sync": opd_in_process(config, assets / "sync", *engine(servers[0]))}
    run = assets / "async"
    out["killed"] = opd_subprocess(
        config,
        run,
        *engine(servers[1]),
        "trainer.max_staleness=1",
        env={"OPD_FAULT": "train@3", "RAY_ADDRESS": ray_address},
        tag="async_killed",
    )
    shutil.copytree(run, assets / "sync_from_2")
    out["resumed"] = opd_in_process(config, run, *engine(servers[1]), "trainer.max_staleness=1")
    out["sync_from_2"] = opd_in_process(config, assets / "sync_from_2", *engine(servers[1]))
    for name, r in out.items():
        assert (r.rc == -9) if name == "killed" else (r.error is None), (name, r.error, r.output[-3000:])
    return out


def same(got: dict, want: dict, ulps: float) -> None:
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], rel=0, abs=metric_atol(want[key], ulps)), key


@pytest.mark.slow
def test_first_async_step_is_the_synchronous_step(runs: dict[str, RunResult]) -> None:
    # the same tokens from another server process: their log-probs enter through the importance weights
    same(runs["killed"].metrics[1], runs["sync"].metrics[1], ulps=2 * FORWARD_ULPS)


@pytest.mark.slow
def test_async_tokens_are_at_most_one_version_old_and_the_correction_sees_them(runs: dict[str, RunResult]) -> None:
    sync, killed = runs["sync"].metrics, runs["killed"].metrics
    assert sorted(killed) == [1, 2]  # step 3 was killed before its metrics were logged
    for step in (1, 2, 3):
        assert sync[step]["async/staleness_max"] == 0.0
    assert killed[1]["async/staleness_max"] == 0.0
    # step 2's batch: its first request sampled by version 0 while step 1 trained; the sync of step 1 may land
    # between its two requests (rollout.batch_size = 2 of 4 rows), so its second may be version 1's
    assert killed[2]["async/staleness_max"] == 1.0 and 0.0 < killed[2]["async/staleness_mean"] <= 1.0
    # the correction's log-ratio ℓ_old − ℓ_roll: rounding when in step, the update of step 1 when one version old
    assert abs(sync[2]["rollout/mismatch_kl"]) < 1e-5 < abs(killed[2]["rollout/mismatch_kl"])
    for key in ("rollout/is_clip_frac", "time/wait_rollout_s", "time/rollout_s", "time/sync_wait_s"):
        assert key in killed[2], key


@pytest.mark.slow
def test_killed_async_run_resumes_with_the_synchronous_rule(runs: dict[str, RunResult]) -> None:
    """In flight at checkpoint 2: the batch of step 3 (sampled by version 1); it is discarded, and the resumed run
    samples step 3 from checkpoint 2's weights: the synchronous step 3 from that checkpoint."""
    resumed, reference = runs["resumed"].metrics, runs["sync_from_2"].metrics
    assert sorted(resumed) == sorted(reference) == [3]
    assert resumed[3]["async/staleness_max"] == 0.0
    same(resumed[3], reference[3], ulps=8)


def test_async_refuses_a_colocated_engine(assets: Path) -> None:
    cfg = load_config(assets / "config.yaml", ["trainer.max_staleness=1", "rollout.offload_when_idle=true"])
    with pytest.raises(ConfigError, match=r"trainer\.max_staleness.*rollout\.offload_when_idle"):
        cfg.validate()
    cfg = load_config(assets / "config.yaml", ["rollout.partial=true"])
    with pytest.raises(ConfigError, match=r"rollout\.partial.*trainer\.max_staleness"):
        cfg.validate()
