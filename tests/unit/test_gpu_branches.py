"""The logic of branches only a GPU takes, run on CPU with CUDA faked present and the CUDA / megatron
calls they make replaced by fakes with the real signatures (``mock.create_autospec`` of megatron-core's
classes). docs/gpu.md lists every GPU-only branch with where it is covered; these are the ones whose
coverage is a CPU test here."""

from __future__ import annotations

import dataclasses
import types
from unittest import mock

import pytest
import torch


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """CUDA faked present with 4 devices; records ``set_device`` and ``empty_cache``."""
    calls = types.SimpleNamespace(set_device=[], empty_cache=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.set_device.append(d))

    def empty_cache() -> None:
        calls.empty_cache += 1

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    return calls


def test_init_distributed_takes_nccl_and_the_local_gpu(cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from megatron_opd.platform import distributed

    seen: dict = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    assert distributed.default_backend() == "nccl"
    distributed.init_distributed(distributed.DistEnv(5, 8, 6, "node3", 1234, "torchrun"), timeout_s=60)
    assert cuda.set_device == [6 % 4]
    assert seen["backend"] == "nccl" and seen["init_method"] == "tcp://node3:1234"
    assert (seen["rank"], seen["world_size"]) == (5, 8)


def test_auto_dtype_and_device_are_bf16_on_cuda(cuda) -> None:
    from megatron_opd.rollout import hf_engine
    from megatron_opd.trainer.worker import resolve_dtype

    assert resolve_dtype("auto") is torch.bfloat16 and resolve_dtype("fp32") is torch.float32
    device = hf_engine.resolve_device("auto")
    assert device == torch.device("cuda") and hf_engine.resolve_dtype("auto", device) is torch.bfloat16


def test_transformer_config_on_cuda(cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU: parameters initialized on the GPU, MoE tokens dispatched all-to-all (CPU: allgather)."""
    from megatron_opd.models import qwen3
    from megatron_opd.models.tiny import tiny_config

    for name in (
        "get_tensor_model_parallel_world_size",
        "get_pipeline_model_parallel_world_size",
        "get_expert_model_parallel_world_size",
        "get_expert_tensor_parallel_world_size",
    ):
        monkeypatch.setattr(qwen3.parallel_state, name, lambda: 1)
    config = qwen3.transformer_config_from_hf(tiny_config(moe=True), params_dtype=torch.bfloat16)
    assert config.moe_token_dispatcher_type == "alltoall" and not config.use_cpu_initialization
    assert config.bf16 and config.params_dtype is torch.bfloat16


def _student_worker() -> tuple:
    """The student's state holding autospec fakes of megatron's DDP buffers and optimizer."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    from megatron_opd.trainer.student import StudentState

    worker = StudentState.__new__(StudentState)
    buffers = [mock.create_autospec(_ParamAndGradBuffer, instance=True) for _ in range(3)]
    for b in buffers:  # set in __init__: the distributed optimizer's buffers hold their parameters' storage
        b.param_data, b.params = torch.zeros(4), [torch.nn.Parameter(torch.zeros(4))]
    worker.model = types.SimpleNamespace(buffers=buffers[:2], expert_parallel_buffers=buffers[2:])
    worker.optimizer = mock.create_autospec(MegatronOptimizer, instance=True)
    return worker, buffers


def test_student_offload_and_onload_use_megatrons_rl_hooks(cuda) -> None:
    worker, buffers = _student_worker()
    worker.offload()
    for b in buffers:  # dense and expert-parallel buffers alike, parameters and gradients
        b.offload_to_cpu.assert_called_once_with(move_params=True, move_grads=True)
    worker.optimizer.offload_to_cpu.assert_called_once_with()
    assert cuda.empty_cache == 1 and worker._host_params == []  # nothing outside the buffers to move
    worker.onload()
    for b in buffers:
        b.reload_from_cpu.assert_called_once_with(move_params=True, move_grads=True)
    worker.optimizer.restore_from_cpu.assert_called_once_with()


def test_frozen_model_offload_moves_the_module(cuda) -> None:
    from megatron_opd.scoring.scorer import ScoringModel

    worker = ScoringModel.__new__(ScoringModel)
    worker.model = mock.create_autospec(torch.nn.Module, instance=True)
    worker.offload()
    worker.onload()
    assert worker.model.method_calls == [mock.call.cpu(), mock.call.cuda()] and cuda.empty_cache == 1


def test_offload_is_a_no_op_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    worker, buffers = _student_worker()
    worker.offload()
    worker.onload()
    assert not worker.optimizer.method_calls and not any(b.method_calls for b in buffers)


def test_checkpoint_keeps_the_cuda_generator(cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_opd.trainer import student_checkpoint

    state = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state)
    rng = student_checkpoint._rng_state()
    assert rng["cuda"] is state and torch.equal(rng["cpu"], torch.get_rng_state())


def _hf_engine_on(device: str) -> object:
    from megatron_opd.rollout.hf_engine import HFEngine

    engine = HFEngine.__new__(HFEngine)
    engine.device = torch.device(device)
    engine.model = mock.create_autospec(torch.nn.Module, instance=True)
    engine._lock = mock.MagicMock()
    return engine


def test_hf_engine_releases_gpu_memory(cuda) -> None:
    engine = _hf_engine_on("cuda")
    engine.release_memory()
    assert engine.model.method_calls == [mock.call.to("cpu")] and cuda.empty_cache == 1
    engine.resume_memory(("kv_cache",))  # nothing kept between calls: only the weights move back
    assert len(engine.model.method_calls) == 1
    engine.resume_memory(("weights",))
    engine.resume_memory(None)
    assert engine.model.method_calls[1:] == [mock.call.to(torch.device("cuda"))] * 2
    cpu = _hf_engine_on("cpu")
    cpu.release_memory()
    cpu.resume_memory(None)
    assert not cpu.model.method_calls


def test_vllm_engine_frees_the_cache_at_shutdown(cuda) -> None:
    """The vLLM engine drops its ``LLM`` and gives the CUDA caching allocator's blocks back."""
    from megatron_opd.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm = mock.Mock()
    engine.shutdown()
    assert engine.llm is None and cuda.empty_cache == 1


def test_nccl_weight_broadcast_sends_from_the_current_gpu(cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender (rank 0 of the group) broadcasts from its current GPU over NCCL, from host memory over gloo."""
    from megatron_opd.rollout import weight_group
    from megatron_opd.rollout.sglang import weight_sync

    assert weight_sync.group_device("gloo") == torch.device("cpu")
    sent = []
    monkeypatch.setattr(weight_group, "init_weight_update_group", lambda *args: "group")
    monkeypatch.setattr(weight_sync, "broadcast_tensors", lambda tensors, group, device, size: sent.append(device))
    sender = weight_sync.LocalWeightSender()
    sender.join("192.0.2.7", 1234, 3, "g", "nccl", 60.0)
    sender.send("g", 1 << 20)
    assert sent == [torch.device("cuda", 3)]


def test_sglang_launch_counts_the_visible_gpus(cuda) -> None:
    from megatron_opd.rollout.base import RolloutError
    from megatron_opd.rollout.config import SGLangConfig
    from megatron_opd.rollout.sglang.launcher import check_gpus

    check_gpus(SGLangConfig(num_servers=2, tp_size=2))  # 4 of 4
    with pytest.raises(RolloutError, match="needs 5 GPUs, this node has 4"):
        check_gpus(SGLangConfig(num_servers=2, tp_size=2, base_gpu_id=1))


def test_worker_groups_are_placed_on_gpu_bundles(cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """Colocated groups share GPUs from bundle 0 (fractional GPU requests); separate ones take
    consecutive bundles of one placement group sized for the whole layout."""
    from megatron_opd.trainer import driver

    asked: list[int] = []
    monkeypatch.setattr(driver, "make_placement_group", lambda n: asked.append(n) or "pg")

    @dataclasses.dataclass
    class Layout:
        world_size: int

    specs = [types.SimpleNamespace(model=types.SimpleNamespace(parallel=Layout(n))) for n in (4, 8, 2)]
    colocated = driver.place(types.SimpleNamespace(trainer=types.SimpleNamespace(colocate=True)), specs)
    separate = driver.place(types.SimpleNamespace(trainer=types.SimpleNamespace(colocate=False)), specs)
    assert asked == [8, 14]
    assert [(p.offset, p.share) for p in colocated] == [(0, 3)] * 3
    assert [(p.offset, p.share) for p in separate] == [(0, 1), (4, 1), (12, 1)]


def _train_in(dtype: str, student: str, samples: list, steps: int) -> tuple[str, list[dict], dict, dict]:
    """Optimizer class, per-step metrics, and per-sample log-probs before and after the steps."""
    from megatron_opd.scoring.contract import ScoreRequest
    from megatron_opd.trainer.worker import ModelWorker
    from tests.trainer.conftest import worker_spec

    spec = worker_spec(student, trainable=True, name="opd")
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, dtype=dtype))
    worker = ModelWorker(spec, 0, 1)
    worker.setup("127.0.0.1", 0)
    opt = worker.student.optimizer.chained_optimizers[0]
    params = {p.dtype for p in worker.student.module.parameters()}
    main = {p.dtype for group in opt.shard_fp32_from_float16_groups for p in group}
    kind = f"{type(opt).__name__} params {sorted(map(str, params))} main {sorted(map(str, main))}"

    def logps() -> dict[int, list[float]]:  # plain lists: tensors would be shared with the exiting process
        return {uid: d.logp.tolist() for uid, d in worker.score(samples, ScoreRequest()).items()}

    before = logps()
    metrics = [worker.train_step(samples).as_dict() for _ in range(steps)]
    return kind, metrics, before, logps()


@pytest.mark.slow
def test_bf16_student_trains_with_fp32_main_weights(tmp_path) -> None:
    """The GPU default dtype (bf16 parameters, megatron's distributed optimizer keeping fp32 main
    weights, fp32 gradient reduction), run on CPU: its first update matches the fp32 student's
    (loss and gradient norm within BF16_ULPS bf16 ulps, relative) and updates move it toward the teacher."""
    from megatron_opd.models.tiny import save_tiny_model, tiny_config
    from megatron_opd.platform.spawn import spawn_world
    from megatron_opd.scoring.contract import TokenScores
    from megatron_opd.selftest.models import BF16_ULPS
    from tests.tolerance import ulps
    from tests.trainer.conftest import VOCAB, hf_scores, make_samples

    student, teacher = str(tmp_path / "student"), str(tmp_path / "teacher")
    save_tiny_model(student, tiny_config(vocab_size=VOCAB), seed=1)
    save_tiny_model(teacher, tiny_config(vocab_size=VOCAB), seed=2, init_std=0.1)
    samples = make_samples(6, seed=11)
    for s in samples:
        s.scores.teacher = TokenScores(hf_scores(teacher, [s])[s.uid].logp.float())
    (bf16,) = spawn_world(_train_in, 1, "bf16", student, samples, 4)
    (fp32,) = spawn_world(_train_in, 1, "fp32", student, samples, 1)
    optimizer, metrics, before, after = bf16
    assert optimizer == "DistributedOptimizer params ['torch.bfloat16'] main ['torch.float32']", optimizer
    assert all(m["train/skipped_updates"] == 0 for m in metrics)
    # means over the tokens of what the bf16 forward pass computed: within bf16 rounding of the fp32 student's, in
    # relative terms as `opd selftest` judges bf16 logits and gradients against fp32 (BF16_ULPS ulps of bf16)
    rel = ulps(torch.bfloat16, 1.0, BF16_ULPS)
    for key in ("train/loss", "train/grad_norm"):
        assert metrics[0][key] == pytest.approx(fp32[1][0][key], rel=rel, abs=0), key
    gap = {
        k: torch.cat([(torch.tensor(d[s.uid]) - s.scores.teacher.logp).abs() for s in samples]).mean()
        for k, d in (("before", before), ("after", after))
    }
    assert gap["after"] < gap["before"], gap
