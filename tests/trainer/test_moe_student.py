"""An MoE student under expert parallelism, on gloo.

- At EP > 1 megatron builds a ``ChainedOptimizer`` (dense and expert-parallel parameters): the train step clips
  each chained optimizer's gradients by the norm over all of them. Two steps at EP=2 × DP=2 equal two steps at
  EP=1 on the same samples: the loss, the gradient norm (clipping active) and the updated weights.
- Its training checkpoints move between EP=1 (one optimizer) and EP=2 (a chained one): a run resumed at the
  other layout continues like the run that kept going at its own. Without the distributed optimizer megatron's
  state of two optimizers cannot become one's: that resume is refused, naming the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from megatron_opd.scoring.contract import TokenScores
from megatron_opd.trainer.batch import Sample, split_for_data_parallel
from tests.tolerance import FORWARD_ULPS, metric_atol, ulps
from tests.trainer.conftest import VOCAB, hf_scores, make_samples, worker_spec

pytestmark = pytest.mark.slow

LR = 3e-3
CLIP = 0.01  # below the gradient norms of these samples (about 0.03): clipping scales every step


def _worker(student: str, ep: int, distributed_optimizer: bool = True) -> object:
    from megatron_opd.trainer.worker import ModelWorker

    world = torch.distributed.get_world_size()
    spec = worker_spec(student, ep=ep, dp=world, trainable=True, name="opd")
    optim = dataclasses.replace(spec.optim, lr=LR, clip_grad=CLIP, use_distributed_optimizer=distributed_optimizer)
    spec = dataclasses.replace(spec, optim=optim)
    worker = ModelWorker(spec, torch.distributed.get_rank(), world)
    worker.setup("127.0.0.1", 0)
    return worker


def _step(worker: object, samples: list[Sample]) -> tuple[dict | None, dict[str, np.ndarray] | None]:
    """One train step on this rank's share; (metrics, the full model in HF naming) on rank 0."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    metrics = worker.train_step(split_for_data_parallel(samples, world)[rank])
    weights = worker.export_hf_tensors()
    if rank != 0:
        return None, None
    return metrics.as_dict(), {n: t.float().numpy().copy() for n, t in weights}


def _train(student: str, samples: list[Sample], ep: int, steps: int) -> list:
    worker = _worker(student, ep)
    return [_step(worker, samples) for _ in range(steps)]


def _save_and_go_on(student: str, samples: list[Sample], ep: int, path: str) -> list:
    """A step, a checkpoint at ``path``, another step."""
    worker = _worker(student, ep)
    first = _step(worker, samples)
    if torch.distributed.get_rank() == 0:
        Path(path).mkdir()
    torch.distributed.barrier()
    worker.save_checkpoint(path, 1)
    return [first, _step(worker, samples)]


def _save_plain(student: str, path: str) -> None:
    """A checkpoint of megatron's non-distributed optimizers (before any update)."""
    worker = _worker(student, 2, distributed_optimizer=False)
    if torch.distributed.get_rank() == 0:
        Path(path).mkdir()
    torch.distributed.barrier()
    worker.save_checkpoint(path, 0)


def _load_plain(student: str, path: str) -> str:
    from megatron_opd.config.errors import ConfigError

    worker = _worker(student, 1, distributed_optimizer=False)
    with pytest.raises(ConfigError) as refused:
        worker.load_checkpoint(path)
    return str(refused.value)


def _resume(student: str, samples: list[Sample], ep: int, path: str) -> list:
    worker = _worker(student, ep)
    worker.load_checkpoint(path)
    return [_step(worker, samples)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Sample]]:
    root = tmp_path_factory.mktemp("moe_student")
    student, teacher = str(root / "student"), str(root / "teacher")
    save_tiny_model(student, tiny_config(moe=True, vocab_size=VOCAB), seed=1)
    save_tiny_model(teacher, tiny_config(moe=True, vocab_size=VOCAB), seed=2, init_std=0.1)
    samples = make_samples(8, seed=13)
    scores = hf_scores(teacher, samples)
    for s in samples:
        s.scores.teacher = TokenScores(scores[s.uid].logp.float())
    return student, samples


def _same_step(got: tuple, want: tuple) -> None:
    """Metrics of another layout: a forward and a backward pass's rounding (2 × FORWARD_ULPS); weights after
    Adam steps ``lr · m / (√v + ε)`` from such gradients: their rounding at the weights' magnitude, and the
    updates' (of size lr) relative rounding."""
    (m_got, w_got), (m_want, w_want) = got, want
    for key in ("train/loss", "train/grad_norm", "student/entropy"):
        assert m_got[key] == pytest.approx(m_want[key], rel=0, abs=metric_atol(m_want[key], 2 * FORWARD_ULPS)), key
    assert m_got["train/skipped_updates"] == 0.0 and m_got["train/grad_norm"] > CLIP
    assert sorted(w_got) == sorted(w_want)
    for name, want in w_want.items():
        atol = ulps(torch.float32, np.abs(want).max(), 2 * FORWARD_ULPS) + ulps(torch.float32, LR, 2 * FORWARD_ULPS)
        np.testing.assert_allclose(w_got[name], want, rtol=0, atol=atol, err_msg=name)


def test_ep2_train_steps_equal_ep1(setup: tuple[str, list[Sample]]) -> None:
    student, samples = setup
    (ep1,) = spawn_world(_train, 1, student, samples, 1, 2)
    ep2 = spawn_world(_train, 2, student, samples, 2, 2)[0]
    for got, want in zip(ep2, ep1):
        _same_step(got, want)
    expert = "model.layers.0.mlp.experts.0.up_proj.weight"  # the steps were applied, to the experts too
    assert not np.array_equal(ep1[0][1][expert], ep1[1][1][expert])


@pytest.mark.parametrize("save_ep,load_ep", [(2, 1), (1, 2)])
def test_checkpoint_moves_between_ep1_and_ep2(
    setup: tuple[str, list[Sample]], tmp_path: Path, save_ep: int, load_ep: int
) -> None:
    student, samples = setup
    path = str(tmp_path / "iter_0000001")
    kept_going = spawn_world(_save_and_go_on, save_ep, student, samples, save_ep, path)[0]
    (resumed,) = spawn_world(_resume, load_ep, student, samples, load_ep, path)[0]
    _same_step(resumed, kept_going[1])


def test_non_distributed_optimizer_checkpoint_does_not_cross_ep1(
    setup: tuple[str, list[Sample]], tmp_path: Path
) -> None:
    student, _ = setup
    path = str(tmp_path / "iter_0000000")
    spawn_world(_save_plain, 2, student, path)
    (message,) = spawn_world(_load_plain, 1, student, path)
    assert message.startswith(
        f"resume={path!r}: the checkpoint holds the state of 2 optimizer(s) and this layout has 1"
    )
    assert "Fix: resume with student.parallel.expert_model_parallel_size > 1" in message
