"""Megatron-Core ``torch_dist`` checkpoint -> HF safetensors, streaming, without building a model.

A checkpoint holds global tensors under keys :func:`~megatron_opd.convert.mapping.parse_sharded_key`
understands, whatever TP/PP/EP wrote it. The reader asks ``dist_checkpointing.load`` for one group
at a time -- the embedding, then every key's slice of one layer (all experts of an MoE layer),
then the final norm and the LM head -- and splits each Megatron tensor into its HF tensors. Peak
memory: the process, one layer (twice: as read and as HF tensors) and one output shard.

Runs in a world of one process (``dist_checkpointing`` needs ``torch.distributed``), spawned by
:func:`convert_mcore_to_hf`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_opd.convert.export import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint
from megatron_opd.convert.hf_io import CheckpointError, load_hf_config
from megatron_opd.convert.mapping import (
    AttentionShape,
    ShardedKey,
    UnmappedParameterError,
    expected_hf_names,
    parse_sharded_key,
    shards_to_hf,
)
from megatron_opd.convert.mcore_io import allow_checkpoint_args, checkpoint_iter_dir, hf_metadata_dir
from megatron_opd.convert.outdir import check_output
from megatron_opd.convert.progress import ConversionReport, peak_rss_bytes

# (key, layer index along the stacked-layer axis, or None for the whole tensor)
_Request = tuple[str, int | None]
OPTIMIZER_KEY_PREFIX = "optimizer."
_TOP_ORDER = {"embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": 1, "output_layer.weight": 2}


def _plan(tensors: dict[str, TensorStorageMetadata]) -> list[list[_Request]]:
    """Read groups in HF order: embedding, each layer, final norm, LM head."""
    top: dict[int, list[_Request]] = {}
    layers: dict[int, list[_Request]] = {}
    for key in sorted(tensors):
        sharded = parse_sharded_key(key)
        if sharded.layer is not None:
            layers.setdefault(sharded.layer, []).append((key, None))
        elif sharded.stacked_layers:
            for layer in sorted({chunk.offsets[0] for chunk in tensors[key].chunks}):
                layers.setdefault(layer, []).append((key, layer))
        else:
            top.setdefault(_TOP_ORDER[key], []).append((key, None))
    order = [top[0]] if 0 in top else []
    order += [layers[i] for i in sorted(layers)]
    return order + [top[i] for i in (1, 2) if i in top]


def _read(iter_dir: Path, group: list[_Request], tensors: dict[str, TensorStorageMetadata]) -> list[torch.Tensor]:
    request = {}
    for i, (key, layer) in enumerate(group):
        meta = tensors[key]
        shape, dtype = tuple(meta.size), meta.properties.dtype
        if layer is None:
            request[str(i)] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
        else:  # one layer of a stacked key, as a [1, ...] chunk (no prepended axis: megatron's
            # prepended-axis path assumes other ranks hold the other chunks, wrong in a world of one)
            buf = torch.empty((1, *shape[1:]), dtype=dtype)
            request[str(i)] = ShardedTensor.from_rank_offsets(key, buf, (0, layer, shape[0]), replica_id=0)
    try:
        loaded = dist_checkpointing.load(request, str(iter_dir), validate_access_integrity=False)
    except (Exception, CheckpointException) as e:  # torch's is a BaseException
        raise CheckpointError(
            f"{iter_dir}: reading {group[0][0]}{'' if group[0][1] is None else f' (layer {group[0][1]})'} "
            f"failed ({e}); the checkpoint may be truncated or incomplete"
        ) from e
    return [loaded[str(i)] if layer is None else loaded[str(i)][0] for i, (_, layer) in enumerate(group)]


def _split(sharded: ShardedKey, prefix: tuple[int, ...], tensor: torch.Tensor, hf_config: Any) -> Iterator:
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    attn = AttentionShape.of(hf_config)
    if sharded.stacked_experts:
        parts = [((*prefix, e), tensor[e]) for e in range(tensor.shape[0])]
    else:
        parts = [(prefix, tensor)]
    for index, t in parts:
        mapping = sharded.mapping(index, tie_word_embeddings=tied)
        yield from zip(mapping.hf, shards_to_hf(mapping.kind, [t], attn))


def iter_checkpoint_hf_tensors(ckpt_dir: str | Path, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for every tensor of a Megatron checkpoint (root or iteration dir), in
    the checkpoint's dtype, one layer read at a time. Needs an initialized ``torch.distributed``
    (a world of one is enough; every rank of a larger world must iterate alike)."""
    iter_dir = checkpoint_iter_dir(ckpt_dir)
    allow_checkpoint_args()
    metadata = FileSystemReader(str(iter_dir)).read_metadata()
    # Model tensors only: a training checkpoint also holds optimizer state (``optimizer.*`` keys).
    tensors = {
        k: v
        for k, v in metadata.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata) and not k.startswith(OPTIMIZER_KEY_PREFIX)
    }
    try:
        groups = _plan(tensors)
    except UnmappedParameterError as e:
        raise CheckpointError(f"{iter_dir}: {e}; not a Qwen3 / Qwen3-MoE checkpoint") from e
    for group in groups:
        for (key, layer), tensor in zip(group, _read(iter_dir, group, tensors)):
            yield from _split(parse_sharded_key(key), () if layer is None else (layer,), tensor, hf_config)


def export_checkpoint(
    ckpt_dir: str, hf_dir: str, out: str, overwrite: bool, max_shard_bytes: int, progress: bool
) -> tuple[int, int]:
    """In an initialized world of one: write checkpoint ``ckpt_dir`` as HF directory ``out``
    (config and tokenizer from ``hf_dir``). Returns (bytes written, peak RSS)."""
    hf_config = load_hf_config(hf_dir)
    expected = expected_hf_names(hf_config)
    written = save_hf_checkpoint(
        iter_checkpoint_hf_tensors(ckpt_dir, hf_config),
        out,
        hf_config,
        tokenizer_dir=hf_dir,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        expected=expected,
        total=len(expected),
        progress=progress,
    )
    return written, peak_rss_bytes()


def convert_mcore_to_hf(
    mcore_dir: str | Path,
    out: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert a Megatron checkpoint (root or iteration dir, with its ``hf/`` metadata) into an HF
    directory at ``out`` (written to a temporary directory, renamed at the end)."""
    from megatron_opd.platform.spawn import spawn_world

    start = time.monotonic()
    iter_dir = checkpoint_iter_dir(mcore_dir)
    hf_dir = hf_metadata_dir(mcore_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(
            f"{mcore_dir}: no {hf_dir.name}/config.json next to the checkpoint; it records the architecture "
            "(checkpoints written by `opd convert hf-to-mcore` and the trainer have it)"
        )
    hf_config = load_hf_config(hf_dir)
    check_output(out, overwrite=overwrite, inputs=(mcore_dir,))
    ((written, rss),) = spawn_world(
        export_checkpoint, 1, str(iter_dir), str(hf_dir), str(out), overwrite, max_shard_bytes, progress
    )
    return ConversionReport(
        tensors=len(expected_hf_names(hf_config)),
        bytes=written,
        seconds=time.monotonic() - start,
        peak_rss={"main": peak_rss_bytes(), "rank0": rss},
    )
