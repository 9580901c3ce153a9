"""``trainer.max_staleness`` end to end on CPU, the engine in its own process (``opd serve``), the teachers on
their own workers (``trainer.colocate=false``: they score a batch ahead while the student trains).

- ``sync``: k = 0, steps 1-3, its own server.
- ``async``: k = 1 on another server; its driver is SIGKILLed after the update of step 3 and resumed.
- ``sync_from_2``: k = 0 from a copy of the async run's checkpoint 2 (the synchronous rule for step 3).
- ``partial``: k = 1 with ``rollout.partial`` on a third server (syncs abort its requests in flight).

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
from tests.reliability.conftest import (  # noqa: F401 (fixtures)
    RunResult,
    assets,
    opd_in_process,
    opd_subprocess,
    ray_address,
)
from tests.rollout.conftest import serve_commands
from tests.tolerance import FORWARD_ULPS, metric_atol

KEYS = ("train/loss", "train/grad_norm", "teacher/reverse_kl", "rollout/response_len")
# the reliability suite's tiny run (opd, 3 steps, a checkpoint each), its engine served, its teacher on its own
# workers, a student at TP=1, two rows per engine request
SETTINGS = (
    "student.parallel.tensor_model_parallel_size=1",
    "rollout.engine=sglang",
    "rollout.batch_size=2",
    "trainer.colocate=false",
    "optim.lr=3.0e-3",
)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("async_runs")


@pytest.fixture(scope="module")
def servers(assets: Path, out: Path) -> Iterator[list[str]]:  # noqa: F811
    """``opd serve`` processes on the student, one per fresh run: it expects its engine at the initial weights."""
    with ServerProcesses(serve_commands(assets / "student", 3), out / "server_logs").start(120) as procs:
        yield procs.urls


def engine(url: str) -> list[str]:
    return [*SETTINGS, f"rollout.sglang.urls=[{url}]"]


@pytest.fixture(scope="module")
def runs(assets: Path, out: Path, servers: list[str], ray_address: str) -> dict[str, RunResult]:  # noqa: F811
    config = assets / "config.yaml"
    result = {"sync": opd_in_process(config, out / "sync", *engine(servers[0]))}
    run = out / "async"
    result["killed"] = opd_subprocess(
        config,
        run,
        *engine(servers[1]),
        "trainer.max_staleness=1",
        env={"OPD_FAULT": "train@3", "RAY_ADDRESS": ray_address},
        tag="async_killed",
    )
    shutil.copytree(run, out / "sync_from_2")
    result["resumed"] = opd_in_process(config, run, *engine(servers[1]), "trainer.max_staleness=1")
    result["sync_from_2"] = opd_in_process(config, out / "sync_from_2", *engine(servers[1]))
    partial = ("trainer.max_staleness=1", "rollout.partial=true", "rollout.max_new_tokens=24")
    result["partial"] = opd_in_process(config, out / "partial", *engine(servers[2]), *partial)
    for name, r in result.items():
        assert (r.rc == -9) if name == "killed" else (r.error is None), (name, r.error, r.output[-3000:])
    return result


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


@pytest.mark.slow
def test_partial_rollouts_train_with_tokens_at_most_one_version_old(runs: dict[str, RunResult]) -> None:
    """Whether a sync lands inside a request is a matter of timing; the versions of the tokens that result are not:
    none is older than one version, per token, whichever part of a response it belongs to."""
    m = runs["partial"].metrics
    assert sorted(m) == [1, 2, 3]
    for step in (1, 2, 3):
        assert m[step]["async/staleness_max"] <= 1.0 and m[step]["rollout/response_len"] <= 24
    assert m[1]["async/staleness_max"] == 0.0


def test_async_refuses_a_colocated_engine(assets: Path) -> None:  # noqa: F811
    cfg = load_config(assets / "config.yaml", [*SETTINGS, "trainer.max_staleness=1", "rollout.offload_when_idle=true"])
    with pytest.raises(ConfigError, match=r"trainer\.max_staleness.*rollout\.offload_when_idle"):
        cfg.validate()
    cfg = load_config(assets / "config.yaml", [*SETTINGS, "rollout.partial=true"])
    with pytest.raises(ConfigError, match=r"rollout\.partial.*trainer\.max_staleness"):
        cfg.validate()


def bench_records(wall_per_step: float, rollout: float) -> list[dict]:
    """Four steps of 1 s score + 1 s train + ``rollout`` s, logged ``wall_per_step`` s apart."""
    return [
        {
            "step": step,
            "time": 100.0 + step * wall_per_step,
            "time/rollout_s": rollout,
            "time/score_s": 1.0,
            "time/train_s": 1.0,
            "async/staleness_mean": 0.0,
            "train/loss": 0.5,
        }
        for step in (1, 2, 3, 4)
    ]


def test_bench_overlap_is_the_share_of_the_rollout_hidden_behind_the_learner() -> None:
    from megatron_opd.bench.async_pipeline import measure

    one_after_another = measure(bench_records(wall_per_step=4.0, rollout=2.0))
    assert one_after_another["steps"] == 3 and one_after_another["wall_s_per_step"] == 4.0
    assert one_after_another["overlap"] == 0.0
    assert measure(bench_records(wall_per_step=2.0, rollout=2.0))["overlap"] == 1.0  # all of it hidden
    assert measure(bench_records(wall_per_step=3.0, rollout=2.0))["overlap"] == 0.5
