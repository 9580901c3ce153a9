"""Training checkpoints as they are on a cluster: Transformer Engine's optimizer and spec, the
memory-efficient distributed-optimizer save (TE faked by ``tests/te_fakes.py``).

- torch's Adam (no TE): a resume after an update continues exactly as the uninterrupted run.
- With TE installed megatron's optimizer is TE's ``FusedAdam`` (step in the param group, only
  ``exp_avg``/``exp_avg_sq`` per parameter, ``state_dict()`` strict about per-parameter keys): a save
  before any update, its resume, and a resume after an update that continues exactly as the
  uninterrupted run.
- A checkpoint of the local spec resumes under the TE spec (which has ``_extra_state`` entries the
  local checkpoint lacks): model and optimizer state equal, by checkpoint key.
- The optimizer state is gathered on DP rank 0 only (``fully_reshardable`` memory-efficient), and the
  checkpoint written at DP=2 resumes at DP=1 with the same state.
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from tests.trainer.conftest import VOCAB, make_samples, worker_spec

SAMPLES = make_samples(4, seed=5)


def _worker(student: str, *, spec: str = "local", dp: int = 1) -> Any:
    from megatron_opd.trainer.worker import ModelWorker

    ws = worker_spec(student, dp=dp, trainable=True, name="sft")
    ws = dataclasses.replace(ws, model=dataclasses.replace(ws.model, spec=spec))
    worker = ModelWorker(ws, torch.distributed.get_rank(), torch.distributed.get_world_size())
    worker.setup("127.0.0.1", 0)
    return worker


def _train(worker: Any) -> None:
    from megatron_opd.trainer.batch import split_for_data_parallel

    info_dp = torch.distributed.get_rank()  # TP=PP=1: the DP rank
    worker.train_step(split_for_data_parallel(SAMPLES, torch.distributed.get_world_size())[info_dp])


def _snapshot(worker: Any) -> dict[str, np.ndarray]:
    """Model parameters, the optimizer's fp32 parameters and moments (all of them, gathered), its
    steps, by checkpoint key."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_opd.convert.mcore_io import model_sharded_state_dict

    def tensors(sharded: Any) -> dict[str, np.ndarray]:
        values = (v for v in nested_values(sharded) if isinstance(v, ShardedTensor))
        return {v.key: v.data.detach().float().numpy().copy() for v in values}

    model_sd = model_sharded_state_dict(worker.student.module)
    opt = worker.student.optimizer.sharded_state_dict(
        model_sd, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
    )
    steps = [g.get("step", -1) for g in opt["optimizer"]["param_groups"]]
    return {**tensors(model_sd), **tensors(opt["param_state"]), "step": np.array(steps, float)}


def _save(worker: Any, path: str, iteration: int) -> None:
    if torch.distributed.get_rank() == 0:
        Path(path).mkdir()  # CheckpointManager.begin makes it
    torch.distributed.barrier()
    worker.save_checkpoint(path, iteration)


def _part(result: dict, name: str, fn: Any) -> None:
    try:
        result[name] = fn()
    except BaseException:  # torch's CheckpointException is one
        result[name] = traceback.format_exc()


def _world1(student: str, root: str) -> dict:
    from tests import te_fakes

    te_fakes.install()
    result: dict = {}

    def cross_spec() -> tuple:
        local = _worker(student)
        _train(local)
        want = _snapshot(local)
        _save(local, f"{root}/local", 1)
        te = _worker(student, spec="te")
        te.load_checkpoint(f"{root}/local")
        return want, _snapshot(te)

    _part(result, "cross_spec", cross_spec)

    def resume_continues(name: str) -> tuple:
        """An update, a save, an update; and a resume from that save with an update."""
        trained = _worker(student)
        _train(trained)
        _save(trained, f"{root}/{name}", 1)
        _train(trained)
        want = _snapshot(trained)
        resumed = _worker(student)
        resumed.load_checkpoint(f"{root}/{name}")
        _train(resumed)
        return want, _snapshot(resumed)

    _part(result, "torch_adam", lambda: resume_continues("adam1"))

    te_fakes.install_fused_adam()

    def fresh_save_and_resume() -> dict:
        fresh = _worker(student)
        assert type(fresh.student.optimizer.optimizer).__name__ == "FusedAdam"
        _save(fresh, f"{root}/step0", 0)  # no update yet: the state is filled in first
        want = _snapshot(fresh)
        resumed = _worker(student)
        resumed.load_checkpoint(f"{root}/step0")
        return want, _snapshot(resumed)

    _part(result, "fresh", fresh_save_and_resume)

    _part(result, "continues", lambda: resume_continues("step1"))
    return result


def _world2_save(student: str, root: str) -> tuple[list, dict]:
    """DP=2: one update, then a save; which ranks built the optimizer state of their whole model part."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    worker = _worker(student, dp=2)
    _train(worker)
    want = _snapshot(worker)
    gathered: list = []
    original = DistributedOptimizer.get_parameter_state_dp_zero

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = original(self, *args, **kwargs)
        gathered.append(state is not None)
        return state

    DistributedOptimizer.get_parameter_state_dp_zero = recording
    _save(worker, f"{root}/dp2", 1)
    return gathered, want


def _world1_load(student: str, root: str) -> dict:
    worker = _worker(student)
    worker.load_checkpoint(f"{root}/dp2")
    return _snapshot(worker)


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ckpt_cluster") / "student"
    save_tiny_model(path, tiny_config(vocab_size=VOCAB), seed=1)
    return str(path)


@pytest.fixture(scope="module")
def world1(student: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    (result,) = spawn_world(_world1, 1, student, str(tmp_path_factory.mktemp("w1")))
    return result


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _result(world1: dict, name: str) -> Any:
    value = world1[name]
    assert not isinstance(value, str), value
    return value


def test_local_spec_checkpoint_resumes_under_transformer_engine(world1: dict) -> None:
    want, got = _result(world1, "cross_spec")
    assert any(k.startswith("optimizer.state.exp_avg.") for k in want) and set(want["step"].tolist()) == {1.0}
    _same(got, want)


def test_torch_adam_resume_continues_like_the_uninterrupted_run(world1: dict) -> None:
    """torch's Adam (no TE) keeps its step per parameter: each a tensor of its own after the load, so the resumed
    update has the uninterrupted run's bias corrections (step 2, not one increment per parameter)."""
    want, got = _result(world1, "torch_adam")
    assert set(want["step"].tolist()) == {2.0}
    _same(got, want)


def test_fused_adam_saves_before_any_update_and_resumes(world1: dict) -> None:
    want, got = _result(world1, "fresh")
    _same(got, want)


def test_fused_adam_resume_continues_like_the_uninterrupted_run(world1: dict) -> None:
    want, got = _result(world1, "continues")
    assert set(want["step"].tolist()) == {2.0}
    _same(got, want)


def test_optimizer_state_gathered_on_dp_rank_0_only_and_resumes_at_another_dp(student: str, tmp_path: Path) -> None:
    saved = spawn_world(_world2_save, 2, student, str(tmp_path))
    assert [g for g, _ in saved] == [[True], [False]]  # one gather per buffer: rank 1 builds nothing
    (loaded,) = spawn_world(_world1_load, 1, student, str(tmp_path))
    _same(loaded, saved[0][1])
