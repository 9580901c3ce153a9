"""Fill a built Megatron model (this rank's TP/PP/EP part) from an HF safetensors directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_opd.convert.hf_io import HFCheckpointReader, load_hf_config
from megatron_opd.convert.mapping import AttentionShape, ParamMapping, hf_to_shard, resolve, stacked_expert_names


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / ``Float16Module`` wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def rank_offsets(model: torch.nn.Module) -> tuple[int, int]:
    """(global index of this stage's first layer, global index of this EP rank's first expert)."""
    model = unwrap_model(model)
    layers = getattr(getattr(model, "decoder", None), "layers", None) or []
    layer_offset = layers[0].layer_number - 1 if len(layers) else 0
    num_experts = model.config.num_moe_experts or 0
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    expert_offset = parallel_state.get_expert_model_parallel_rank() * (num_experts // ep_size)
    return layer_offset, expert_offset


def tp_rank_size(mapping: ParamMapping) -> tuple[int, int]:
    if mapping.tp_axis == "etp":
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def param_mappings(model: torch.nn.Module, hf_config: Any) -> list[tuple[str, torch.Tensor, ParamMapping]]:
    """(local name, parameter, mapping) for every parameter of this rank's model part; a parameter that stacks
    the local experts comes as one view of its data per expert (named as Transformer Engine names it)."""
    layer_offset, expert_offset = rank_offsets(model)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    named: list[tuple[str, torch.Tensor]] = []
    for name, p in unwrap_model(model).named_parameters():
        per_expert = stacked_expert_names(name, p.shape[0])
        named += [(name, p)] if per_expert is None else list(zip(per_expert, p.detach().unbind(0)))
    return [
        (name, p, resolve(name, layer_offset=layer_offset, expert_offset=expert_offset, tie_word_embeddings=tied))
        for name, p in named
    ]


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path) -> None:
    """Copy this rank's shard of every parameter from ``hf_dir`` into ``model``.

    Reads only the tensors (or, for vocab- and column-split tensors, the rows) this rank owns, so
    no rank ever holds the whole model. Raises :class:`~megatron_opd.convert.hf_io.CheckpointError`
    for a missing tensor or a shape that does not match the model.
    """
    from megatron_opd.convert.hf_io import CheckpointError

    hf_config = load_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    attn = AttentionShape.of(hf_config)
    for name, param, mapping in param_mappings(model, hf_config):
        rank, size = tp_rank_size(mapping)
        if mapping.kind == "column":
            rows = reader.shape(mapping.hf[0])[0]
            if rows % size:
                raise CheckpointError(f"{mapping.hf[0]}: {rows} rows do not split over {size} ranks")
            step = rows // size
            shard = reader.get_rows(mapping.hf[0], rank * step, (rank + 1) * step)
        else:
            shard = hf_to_shard(mapping.kind, [reader.get(n) for n in mapping.hf], rank, size, attn)
        if tuple(shard.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{name}: checkpoint gives shape {tuple(shard.shape)} from {list(mapping.hf)}, "
                f"the model expects {tuple(param.shape)}; is {hf_dir} the same architecture?"
            )
        param.copy_(shard.to(param.dtype))
