"""Full HF tensors from a live, sharded Megatron model (weight sync, export) and writing HF
checkpoint directories.

:func:`iter_hf_tensors` walks one global list of parameter groups (a group is one Megatron
parameter: e.g. ``linear_qkv`` -> q, k, v; an expert's ``linear_fc1`` -> gate, up) in HF order. For
each, the ranks holding it (one DP replica: the TP / expert-TP group of its pipeline stage and EP
rank) all-gather its TP shards, the group's TP rank 0 rebuilds the HF tensors, and sends them to
rank ``dst`` (default 0) or to every rank (``dst=None``, a broadcast). Memory: one group at a time. Every rank must run the
iterator to its end in the same order (it is made of collectives).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_opd.convert.hf_io import CheckpointError, HFShardWriter, write_hf_metadata
from megatron_opd.convert.load import param_mappings, tp_rank_size
from megatron_opd.convert.mapping import AttentionShape, ParamMapping, hf_order_key, hf_shapes, shards_to_hf
from megatron_opd.convert.outdir import atomic_output_dir
from megatron_opd.convert.progress import TensorProgress

DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


@dataclasses.dataclass(frozen=True)
class _Group:
    """One Megatron parameter, as every rank sees it: its HF tensors and which rank sends them."""

    hf: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    src: int  # global rank of the TP-rank-0 holder in the first DP replica


def _replica_rank(mapping: ParamMapping) -> int:
    """This rank's index among the copies of its shard of ``mapping``'s parameter (0: the one used)."""
    if mapping.tp_axis == "etp":
        return parallel_state.get_expert_data_parallel_rank()
    return parallel_state.get_data_parallel_rank()


def _catalogue(
    model: torch.nn.Module, hf_config: Any
) -> tuple[list[_Group], dict[tuple[str, ...], tuple[torch.nn.Parameter, ParamMapping]]]:
    """The global, ordered list of groups (same on all ranks), and this rank's (param, mapping) by HF names."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    attn = AttentionShape.of(hf_config)
    local: dict[tuple[str, ...], tuple[torch.nn.Parameter, ParamMapping]] = {}
    sent: list[_Group] = []
    for name, param, mapping in param_mappings(model, hf_config):
        if tied and name == "output_layer.weight":
            continue  # a pipeline-last stage's copy of the embedding
        local[mapping.hf] = (param, mapping)
        tp_rank, tp_size = tp_rank_size(mapping)
        if tp_rank == 0 and _replica_rank(mapping) == 0:
            shapes = tuple(hf_shapes(mapping.kind, tuple(param.shape), tp_size, attn))
            sent.append(_Group(mapping.hf, shapes, param.dtype, dist.get_rank()))
    gathered: list[list[_Group]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, sent)
    groups = sorted((g for part in gathered for g in part), key=lambda g: hf_order_key(g.hf[0]))
    if len({g.hf for g in groups}) != len(groups):
        raise RuntimeError("a parameter group has several source ranks; the parallel state is inconsistent")
    return groups, local


def _gather(param: torch.Tensor, mapping: ParamMapping) -> list[torch.Tensor]:
    """All TP (or expert-TP) shards of ``param``, in rank order (collective over that group)."""
    _, size = tp_rank_size(mapping)
    if size == 1:
        return [param.detach()]
    group = (
        parallel_state.get_expert_tensor_parallel_group()
        if mapping.tp_axis == "etp"
        else parallel_state.get_tensor_model_parallel_group()
    )
    shards = [torch.empty_like(param) for _ in range(size)]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    return shards


def hf_tensor_specs(model: torch.nn.Module, hf_config: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(hf_name, dtype, shape)`` of every tensor :func:`iter_hf_tensors` yields, in its order,
    without gathering any data (collective: metadata only)."""
    groups, _ = _catalogue(model, hf_config)
    return [(name, g.dtype, shape) for g in groups for name, shape in zip(g.hf, g.shapes)]


@torch.no_grad()
def iter_hf_tensors(
    model: torch.nn.Module, hf_config: Any, *, dst: int | None = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every tensor of the model, gathered over TP / expert TP, EP and
    PP, in HF order, with HF on-disk names (per-expert keys; no ``lm_head.weight`` when tied).

    Call inside the model's initialized world on every rank. ``dst=r`` (default 0): only global
    rank ``r`` yields, the others yield nothing but must still exhaust the iterator; ``dst=None``:
    every rank receives every tensor (a broadcast per tensor). Tensors are on the model's device,
    in its dtype, and may be views of the parameters (TP=1): copy what you keep.
    """
    groups, local = _catalogue(model, hf_config)
    attn = AttentionShape.of(hf_config)
    me = dist.get_rank()
    device = next(model.parameters()).device
    for group in groups:
        tensors: list[torch.Tensor] = []
        held = local.get(group.hf)
        if held is not None and _replica_rank(held[1]) == 0:
            shards = _gather(*held)
            if me == group.src:
                tensors = [t.contiguous() for t in shards_to_hf(held[1].kind, shards, attn)]
            del shards
        for i, name in enumerate(group.hf):
            if dst is None:
                buf = tensors[i] if tensors else torch.empty(group.shapes[i], dtype=group.dtype, device=device)
                dist.broadcast(buf, src=group.src)
                yield name, buf
            elif me == group.src == dst:
                yield name, tensors[i]
            elif me == group.src:
                dist.send(tensors[i], dst=dst)
            elif me == dst:
                buf = torch.empty(group.shapes[i], dtype=group.dtype, device=device)
                dist.recv(buf, src=group.src)
                yield name, buf


def save_hf_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    hf_config: Any,
    *,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    expected: Iterable[str] | None = None,
    total: int | None = None,
    progress: bool = False,
) -> int:
    """Write ``named_tensors`` as an HF directory: safetensors shards of at most ``max_shard_bytes``
    with ``model.safetensors.index.json``, ``config.json`` (``dtype`` set to the tensors' when they
    share one), ``generation_config.json`` and the tokenizer files of ``tokenizer_dir``.

    Streams: holds one shard's tensors at most. Atomic: written to a temporary sibling of
    ``out_dir`` and renamed at the end; an existing ``out_dir`` is replaced only with
    ``overwrite``. ``expected``: the exact set of names to be written (else nothing is left).
    ``total``: the number of tensors, for the progress bar. Returns the bytes of tensor data.
    """
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = HFShardWriter(tmp, max_shard_bytes)
        with TensorProgress(total, "write safetensors", enabled=progress) as bar:
            for name, tensor in named_tensors:
                writer.add(name, tensor)
                bar.update(tensor.nbytes)
        if expected is not None:
            expected = set(expected)
            missing, extra = sorted(expected - writer.names), sorted(writer.names - expected)
            if missing or extra:
                raise CheckpointError(
                    f"{out_dir}: the tensors do not match the config (missing {missing[:5]}, unexpected {extra[:5]})"
                )
        writer.close()
        dtype = next(iter(writer.dtypes)) if len(writer.dtypes) == 1 else None
        write_hf_metadata(tmp, hf_config, source_dir=tokenizer_dir, dtype=dtype)
    return writer.total_bytes
