"""The student's weights in HF naming for the rollout engine, gathered from every rank of its group: to the
driver as tensors, into an HF directory written by rank 0 (SGLang's disk sync), or broadcast by rank 0 over
SGLang's weight-update groups (its distributed sync; the driver's ``StudentWeightSender`` drives it).
Every rank takes part in the gathers; rank 0 holds the result.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_opd.convert.export import hf_tensor_specs, iter_hf_tensors, save_hf_checkpoint
from megatron_opd.rollout.sglang.weight_sync import TensorSpec, broadcast_tensors, group_device
from megatron_opd.rollout.weight_group import (
    destroy_weight_update_group,
    dtype_name,
    init_weight_update_group,
    rendezvous_address,
)


class WeightExport:
    """One rank's side of exporting ``module`` (the student's ``GPTModel``, described by ``hf_config``)."""

    def __init__(self, module: torch.nn.Module, hf_config: Any, rank: int) -> None:
        self.module, self.hf_config, self.rank = module, hf_config, rank
        self._groups: dict[str, tuple[Any, str]] = {}  # rank 0: the weight-update groups it broadcasts to

    def tensors(self) -> list[tuple[str, torch.Tensor]] | None:
        """The full model in HF naming (CPU tensors) on rank 0, ``None`` on the others."""
        pairs = [(n, t.detach().cpu()) for n, t in iter_hf_tensors(self.module, self.hf_config)]
        return pairs if self.rank == 0 else None

    def save(self, out_dir: str, tokenizer_dir: str) -> int | None:
        """Write the full model as an HF safetensors directory from rank 0, streaming (one shard in memory at a
        time). Bytes written on rank 0."""
        pairs = iter_hf_tensors(self.module, self.hf_config)
        if self.rank != 0:
            for _ in pairs:
                pass
            return None
        cpu = ((n, t.detach().cpu()) for n, t in pairs)
        return save_hf_checkpoint(cpu, out_dir, self.hf_config, tokenizer_dir=tokenizer_dir, overwrite=True)

    # SGLang's distributed sync: rank 0 hosts the weight-update group's TCP store and broadcasts

    def rendezvous(self, master_address: str | None, master_port: int) -> tuple[str, int] | None:
        """Rank 0: where it will host the weight-update group's TCP store (default: this node's address)."""
        return rendezvous_address(master_address, master_port) if self.rank == 0 else None

    def join(self, address: str, port: int, world_size: int, group_name: str, backend: str, timeout_s: float) -> None:
        """Rank 0 joins the weight-update group as its rank 0 (returns once every server joined)."""
        if self.rank == 0:
            group = init_weight_update_group(address, port, 0, world_size, group_name, backend, timeout_s)
            self._groups[group_name] = (group, backend)

    def specs(self) -> list[TensorSpec] | None:
        """Rank 0: name, dtype and shape of every HF tensor :meth:`broadcast` sends, in order."""
        specs = hf_tensor_specs(self.module, self.hf_config)
        return [TensorSpec(n, dtype_name(d), shape) for n, d, shape in specs] if self.rank == 0 else None

    def broadcast(self, group_name: str, bucket_bytes: int) -> int | None:
        """The full model gathered to rank 0, which broadcasts each tensor over the weight-update group (a bucket
        at a time). Rank 0: the number sent."""
        tensors = iter_hf_tensors(self.module, self.hf_config)
        if self.rank != 0:
            for _ in tensors:
                pass
            return None
        group, backend = self._groups[group_name]
        return broadcast_tensors(tensors, group, group_device(backend), bucket_bytes)

    def leave(self, group_name: str) -> None:
        if group_name in self._groups:
            destroy_weight_update_group(self._groups.pop(group_name)[0])
