"""The trainer -> rollout-server weight broadcast, round trip: a trainer rank sends tensors of the
dtypes a model has through :class:`~megatron_opd.rollout.sglang.weight_sync.DistributedWeightSync`
(several buckets), a receiver rank takes them with
:func:`~megatron_opd.rollout.weight_group.receive_weights` (SGLang's side), and every tensor must
arrive bit-exact. NCCL between two GPUs where there are two; gloo between two processes on CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_opd.selftest.report import Skip

GROUP = "opd_selftest"


def payload() -> list[tuple[str, torch.Tensor]]:
    """Named tensors of a model's dtypes and shapes (one larger than a 1 MiB bucket)."""
    g = torch.Generator().manual_seed(6)
    return [
        ("model.embed_tokens.weight", torch.randn(1024, 640, generator=g).to(torch.bfloat16)),
        ("model.layers.0.input_layernorm.weight", torch.randn(640, generator=g)),
        ("model.layers.0.mlp.experts.0.down_proj.weight", torch.randn(640, 96, generator=g).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(512, 640, generator=g).to(torch.float16)),
    ]


def _wire(t: torch.Tensor) -> tuple[str, bytes]:
    """A tensor's dtype and raw bytes."""
    return str(t.dtype), t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _rank(port: int, backend: str) -> dict[str, tuple[str, bytes]] | int:
    import torch.distributed as dist

    from megatron_opd.rollout.sglang.weight_sync import DistributedWeightSync, LocalWeightSender
    from megatron_opd.rollout.weight_group import (
        destroy_weight_update_group,
        dtype_name,
        init_weight_update_group,
        receive_weights,
    )

    tensors = payload()
    if dist.get_rank() == 0:  # the trainer; the "server" joins by itself, so its HTTP calls are no-ops
        sender = LocalWeightSender()  # this process is rank 0 of the group, as a student's rank 0 is
        sender.set_tensors(tensors)
        sync = DistributedWeightSync(
            ["selftest-receiver"],
            [1],
            lambda url, path, body, timeout: {},
            sender,
            master_address="127.0.0.1",
            master_port=port,
            backend=backend,
            group_name=GROUP,
            bucket_mb=1,
            timeout_s=120,
        )
        sent = sync.update(weight_version="selftest")
        sync.destroy()
        return sent
    group = init_weight_update_group("127.0.0.1", port, 1, 2, GROUP, backend, timeout_s=120)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    received = receive_weights(
        group,
        [n for n, _ in tensors],
        [dtype_name(t.dtype) for _, t in tensors],
        [list(t.shape) for _, t in tensors],
        device,
    )
    destroy_weight_update_group(group)
    return {n: _wire(t) for n, t in received}  # plain bytes: tensors would be shared with the exiting process


def round_trip(device: torch.device) -> Callable[[], tuple[str, dict]]:
    def check() -> tuple[str, dict[str, Any]]:
        from megatron_opd.platform.distributed import free_port
        from megatron_opd.platform.spawn import spawn_world

        if device.type == "cuda":
            if torch.cuda.device_count() < 2:
                raise Skip(f"the NCCL round trip needs 2 GPUs, {torch.cuda.device_count()} visible")
            backend = "nccl"
        else:
            backend = "gloo"
        sent, received = spawn_world(_rank, 2, free_port(), backend, timeout_s=300)
        want = dict(payload())
        assert sent == len(want), f"sent {sent} tensors of {len(want)}"
        assert received.keys() == want.keys(), f"received {sorted(received)}"
        bad = [n for n, t in want.items() if received[n] != _wire(t)]
        assert not bad, f"tensors changed in transit: {bad}"
        size = sum(t.numel() * t.element_size() for t in want.values())
        return f"{backend}: {len(want)} tensors ({size / 2**20:.1f} MiB, 1 MiB buckets) bit-exact", {"backend": backend}

    return check
