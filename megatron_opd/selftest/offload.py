"""A colocated student's GPU memory released and restored between its steps (``offload_when_idle``):
a tiny Qwen3 student takes one OPD step, moves its parameters, gradients and optimizer state to the
host through megatron-core's RL hooks, comes back, and must hold bit-identical parameters and optimizer
state and train on, with the GPU memory it held released meanwhile. In bf16 (the GPU default) and fp32."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_opd.selftest.report import Skip

MIN_RELEASED = 0.5  # share of the student's GPU memory that offloading must release


def _samples() -> list[Any]:
    from megatron_opd.scoring.contract import TokenScores
    from megatron_opd.trainer.batch import Sample

    g = torch.Generator().manual_seed(7)
    out = []
    for uid in range(8):
        ids = torch.randint(1, 512, (40,), generator=g).tolist()
        s = Sample(uid=uid, prompt_ids=ids[:8], response_ids=ids[8:], rollout_logp=[-1.0] * 32)
        s.scores.teacher = TokenScores(logp=-torch.rand(32, generator=g) - 0.5)
        out.append(s)
    return out


def _state(worker: Any) -> dict[str, torch.Tensor]:
    """Parameters and optimizer tensors, copied to the host."""
    out = {f"param/{n}": p.detach().cpu().clone() for n, p in worker.student.module.named_parameters()}
    for i, opt in enumerate(worker.student.optimizer.chained_optimizers):
        for j, state in enumerate(opt.optimizer.state.values()):
            out.update({f"opt{i}/{j}/{k}": v.detach().cpu().clone() for k, v in state.items() if torch.is_tensor(v)})
    return out


def round_trip(hf_dir: Callable[[], Path], dtype: str, device: torch.device) -> Callable[[], tuple[str, dict]]:
    def check() -> tuple[str, dict[str, Any]]:
        from megatron_opd.config.schema import ModelConfig, OptimConfig
        from megatron_opd.objectives.config import ObjectiveConfig
        from megatron_opd.objectives.registry import build_objective
        from megatron_opd.platform.distributed import free_port
        from megatron_opd.trainer.worker import ModelWorker, WorkerSpec

        if device.type != "cuda":
            raise Skip("offloading moves GPU memory: a no-op without CUDA")
        path = str(hf_dir())
        gc.collect()
        base = torch.cuda.memory_allocated()  # what earlier checks still hold
        spec = WorkerSpec(
            group="student",
            model=ModelConfig(path, dtype=dtype),
            load_from=path,
            trainable=True,
            optim=OptimConfig(lr=1e-4),
            objective=build_objective(ObjectiveConfig(name="opd")),
            total_steps=3,
            max_tokens_per_microbatch=256,
        )
        worker = ModelWorker(spec, 0, 1)
        worker.setup("127.0.0.1", free_port())
        samples = _samples()
        first = worker.train_step(samples)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        before = _state(worker)
        worker.offload()
        torch.cuda.synchronize()
        during = torch.cuda.memory_allocated() - base
        worker.onload()
        after = _state(worker)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"changed by offload + onload: {changed[:5]}"
        second = worker.train_step(samples)
        assert all(torch.isfinite(torch.tensor(m.loss)) for m in (first, second)), "non-finite loss"
        released = 1 - during / max(held, 1)
        del worker
        torch.cuda.empty_cache()
        assert released >= MIN_RELEASED, f"offloading released {released:.0%} of {held / 2**20:.0f} MiB"
        return f"{dtype}: released {released:.0%} of {held / 2**20:.0f} MiB, state bit-identical, trains on", {
            "held_bytes": held,
            "offloaded_bytes": during,
            "tensors_checked": len(before),
        }

    return check


def checks(hf_dir: Callable[[], Path], device: torch.device) -> dict[str, Callable[[], tuple[str, dict]]]:
    return {f"trainer/offload round trip {d}": round_trip(hf_dir, d, device) for d in ("bf16", "fp32")}
