"""Non-finite numbers and empty losses never reach the weights.

- The driver's check of every score (NaN, +inf, -inf where a log-prob must be finite).
- The student's train step at DP=2: a non-finite loss in one micro-batch of one DP rank, non-finite
  student logits, and a step whose response tokens are all masked skip the update on every rank
  (counted); the next clean step updates again.
- End to end: a teacher whose LM head is NaN gets its steps skipped (logged, counted in the metrics
  and the checkpoint) until ``trainer.max_bad_steps`` is exceeded, then the run stops with an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from megatron_opd.scoring.contract import SampleScores, TokenScores
from megatron_opd.trainer.batch import Sample, split_for_data_parallel
from tests.reliability.conftest import opd_in_process
from tests.trainer.conftest import VOCAB, make_samples, worker_spec

pytestmark = pytest.mark.slow


def scored(n: int) -> list[Sample]:
    samples = make_samples(n, seed=5)
    for s in samples:
        s.scores.teacher = TokenScores(-torch.rand(s.response_len) - 0.5)
    return samples


# (source, field, value, passes): -inf is a zero-probability entry in a top-K list, but never the teacher's
# log-prob of a sampled token.
SCORE_FIELDS = [("teacher", "logp"), ("reference", "logp"), ("student", "logp"), ("teacher", "topk_logp")]
SCORE_CASES = [(src, f, v, False) for src, f in SCORE_FIELDS for v in (math.nan, math.inf)]
SCORE_CASES += [("teacher", "logp", -math.inf, False), ("teacher", "topk_logp", -math.inf, True)]


@pytest.mark.fault("NaN / inf in teacher or reference scores", "detected before the update")
@pytest.mark.parametrize(("source", "field", "value", "passes"), SCORE_CASES)
def test_score_check_finds_non_finite_values(source: str, field: str, value: float, passes: bool) -> None:
    from megatron_opd.trainer.driver import scores_finite

    samples = scored(3)
    for s in samples:
        scores = getattr(s.scores, source) or TokenScores(-torch.rand(s.response_len))
        shape = (s.response_len, 2) if field == "topk_logp" else (s.response_len,)
        setattr(scores, field, -torch.rand(shape))
        setattr(s.scores, source, scores)
    assert scores_finite(samples)
    getattr(getattr(samples[1].scores, source), field).view(-1)[0] = value
    assert scores_finite(samples) is passes


def _params(worker) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in worker.student.module.parameters()])


def _steps(student: str, samples: list[Sample]) -> list[tuple[str, float, bool]]:
    """Per step on this rank: (name, skipped_updates, weights changed)."""
    from megatron_opd.trainer.worker import ModelWorker

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = ModelWorker(worker_spec(student, dp=2, trainable=True, name="opd"), rank, world)
    info = worker.setup("127.0.0.1", 0)
    mine = split_for_data_parallel(samples, info.dp_size)[info.dp_rank]
    poisoned_uid = split_for_data_parallel(samples, 2)[1][0].uid  # lives on DP rank 1 only

    def poison(value: float) -> list[Sample]:
        out = [dataclasses.replace(s) for s in mine]
        for s in out:
            if s.uid == poisoned_uid:
                logp = s.scores.teacher.logp.clone()
                logp[-1] = value
                s.scores = SampleScores(teacher=TokenScores(logp))
        return out

    def masked() -> list[Sample]:
        return [dataclasses.replace(s, response_mask=torch.zeros(s.response_len)) for s in mine]

    plan = [("clean", lambda: mine), ("nan_loss", lambda: poison(math.nan)), ("inf_loss", lambda: poison(-math.inf))]
    plan += [("all_masked", masked), ("clean_again", lambda: mine)]
    out = []
    for name, batch in plan:
        before = _params(worker)
        metrics = worker.train_step(batch())
        out.append((name, float(metrics.skipped_updates), not torch.equal(before, _params(worker))))
    with torch.no_grad():  # non-finite student logits: a NaN in the LM head
        worker.student.module.output_layer.weight[0, 0] = math.nan
    before = _params(worker)
    metrics = worker.train_step(mine)
    after = _params(worker)
    out.append(("nan_logits", float(metrics.skipped_updates), not torch.equal(before.nan_to_num(), after.nan_to_num())))
    return out


@pytest.mark.fault("NaN / inf loss in one micro-batch, NaN student logits, all responses masked", "update skipped")
def test_train_step_skips_bad_updates_on_every_rank(tmp_path: Path) -> None:
    student = str(tmp_path / "student")
    save_tiny_model(student, tiny_config(vocab_size=VOCAB), seed=1)
    samples = scored(6)
    want = [
        ("clean", 0.0, True),
        ("nan_loss", 1.0, False),
        ("inf_loss", 1.0, False),
        ("all_masked", 1.0, False),
        ("clean_again", 0.0, True),
        ("nan_logits", 1.0, False),
    ]
    assert spawn_world(_steps, 2, student, samples) == [want, want]


@pytest.mark.fault("teacher with NaN weights", "steps skipped and counted, then the run stops (max_bad_steps)")
def test_nan_teacher_steps_are_skipped_then_the_run_stops(assets: Path, tmp_path: Path, ray_address: str) -> None:
    from megatron_opd.trainer.driver import NonFiniteScores

    run_dir = tmp_path / "run"
    result = opd_in_process(
        assets / "config.yaml",
        run_dir,
        f"teachers.0.path={assets / 'teacher_nan'}",
        "student.parallel.tensor_model_parallel_size=1",
        "trainer.max_bad_steps=1",
    )
    assert isinstance(result.error, NonFiniteScores), f"{result.error}\n{result.output[-3000:]}"
    assert str(result.error).startswith("2 steps had non-finite") and "(trainer.max_bad_steps=1)" in str(result.error)
    for step in (1, 2):
        assert f"step {step}: non-finite teacher/reference scores; skipping the update" in result.output
    assert sorted(result.metrics) == [1]  # step 1 skipped and logged, step 2 stopped the run
    assert result.metrics[1]["train/bad_steps"] == 1 and "train/loss" not in result.metrics[1]
    state = json.loads((run_dir / "checkpoints" / "iter_0000001" / "trainer_state.json").read_text())
    assert state["bad_steps"] == 1  # a resumed run keeps counting
