"""Megatron-Core ``torch_dist`` checkpoints of a model (``megatron.core.dist_checkpointing``).

Layout (Megatron-LM's, plus the HF metadata that makes a checkpoint self-describing)::

    CKPT/latest_checkpointed_iteration.txt    "<iteration>", written last (the commit point)
    CKPT/iter_0000000/                        metadata.json, common.pt, .metadata, __<rank>_<i>.distcp
    CKPT/hf/                                  config.json, generation_config.json, tokenizer files

The checkpoint holds ``{"model": <model.sharded_state_dict()>, "checkpoint_version": 3.0,
"iteration": N, "args": <Megatron-LM style argparse.Namespace>}``: the tensors are global (layers
stacked, experts indexed globally), so :func:`load_model_checkpoint` loads it into a model built
at any TP/PP/EP layout. Keys are Transformer Engine's whichever spec built the model (the local
spec maps its norms to TE names, and SequentialMLP and TEGroupedMLP write the same expert keys);
TE's ``_extra_state`` entries (FP8 metadata) may be absent and are then left as they are.

Saving goes through :class:`StreamingSaveStrategy`, a synchronous torch_dist strategy that works
on CPU/gloo (megatron's default strategy forks writer processes that need ``psutil``) and that
materializes tensors lazily: a model built on the ``meta`` device is saved with a
:data:`TensorSource` reading each chunk only when the writer reaches it, so a conversion holds
one tensor group (plus one bounded output file) instead of the model.
"""

from __future__ import annotations

import argparse
import math
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

from megatron_opd.convert.hf_io import CheckpointError, write_hf_metadata
from megatron_opd.convert.load import unwrap_model
from megatron_opd.convert.progress import TensorProgress

TRACKER_FILE = "latest_checkpointed_iteration.txt"
HF_SUBDIR = "hf"
CHECKPOINT_VERSION = 3.0
DEFAULT_FILE_BYTES = 512 * 2**20
EXTRA_STATE_SUFFIX = "_extra_state"

# (checkpoint key, global offsets of the chunk, chunk sizes) -> the chunk's data
TensorSource = Callable[[str, tuple[int, ...], tuple[int, ...]], torch.Tensor]


# ---- layout ----


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def write_tracker(ckpt_dir: str | Path, iteration: int) -> None:
    (Path(ckpt_dir) / TRACKER_FILE).write_text(f"{iteration}\n")


def read_tracker(ckpt_dir: str | Path) -> int | None:
    """The iteration named by the tracker file (``None`` for a ``release`` checkpoint)."""
    text = (Path(ckpt_dir) / TRACKER_FILE).read_text().strip()
    if text == "release":
        return None
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{Path(ckpt_dir) / TRACKER_FILE}: {text!r} is not an iteration number") from None


def is_mcore_checkpoint(path: str | Path) -> bool:
    """A checkpoint root (with the tracker file) or one iteration directory of one."""
    path = Path(path)
    return (path / TRACKER_FILE).is_file() or (path / "metadata.json").is_file()


def checkpoint_iter_dir(path: str | Path) -> Path:
    """The iteration directory of a checkpoint root (via its tracker file), or ``path`` itself when
    it is an iteration directory."""
    path = Path(path)
    if (path / TRACKER_FILE).is_file():
        iteration = read_tracker(path)
        iter_dir = path / ("release" if iteration is None else iter_dir_name(iteration))
        if not (iter_dir / "metadata.json").is_file():
            raise CheckpointError(f"{path}: {TRACKER_FILE} names {iter_dir.name}, which is missing or incomplete")
        return iter_dir
    if (path / "metadata.json").is_file():
        return path
    raise CheckpointError(
        f"{path}: not a Megatron checkpoint (no {TRACKER_FILE} and no metadata.json); "
        "expected a directory written by `opd convert hf-to-mcore` or the trainer"
    )


def hf_metadata_dir(path: str | Path) -> Path:
    """The ``hf/`` directory (config + tokenizer) of a checkpoint, given its root or iteration dir."""
    path = Path(path)
    root = path if (path / TRACKER_FILE).is_file() else path.parent
    return root / HF_SUBDIR


# ---- state ----


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, Any]:
    """The sharded state dict of this rank's model part (wrappers removed), keys under ``prefix``."""
    return unwrap_model(model).sharded_state_dict(prefix=prefix)


def megatron_args(model: torch.nn.Module, hf_config: Any) -> argparse.Namespace:
    """The ``args`` entry Megatron-LM's loader reads from a checkpoint (parallel sizes it compares
    against the run, architecture it checks), with Megatron-LM's argument names."""
    from megatron_opd.models.qwen3 import rope_theta

    c = unwrap_model(model).config
    return argparse.Namespace(
        tensor_model_parallel_size=c.tensor_model_parallel_size,
        pipeline_model_parallel_size=c.pipeline_model_parallel_size,
        expert_model_parallel_size=c.expert_model_parallel_size,
        expert_tensor_parallel_size=c.expert_tensor_parallel_size,
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads,
        group_query_attention=c.num_query_groups != c.num_attention_heads,
        num_query_groups=c.num_query_groups,
        kv_channels=c.kv_channels,
        num_experts=c.num_moe_experts,
        moe_ffn_hidden_size=c.moe_ffn_hidden_size,
        moe_router_topk=c.moe_router_topk,
        padded_vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
        normalization="RMSNorm",
        norm_epsilon=c.layernorm_epsilon,
        swiglu=True,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        untie_embeddings_and_output_weights=not getattr(hf_config, "tie_word_embeddings", False),
        params_dtype=c.params_dtype,
        bf16=c.bf16,
        fp16=c.fp16,
        ckpt_format="torch_dist",
        no_save_optim=True,
        no_save_rng=True,
    )


def allow_checkpoint_args() -> None:
    """Let ``torch.load(weights_only=True)`` (megatron's ``common.pt`` loader) read the ``args``
    namespace, as Megatron-LM does."""
    torch.serialization.add_safe_globals([argparse.Namespace])


# ---- saving ----


def _item_bytes(item: WriteItem) -> int:
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


class _MaterializingPlanner(MCoreSavePlanner):
    """megatron's planner, resolving ``meta`` tensors through a :data:`TensorSource` when the writer
    asks for them (one at a time), and counting what is written. With a source every tensor must be
    on the meta device: any other holds values the source did not give."""

    def __init__(self, source: TensorSource | None, progress: bool) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._source = source
        self._progress_enabled = progress
        self.progress: TensorProgress | None = None

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        tensors = sum(item.type != WriteItemType.BYTE_IO for item in plan.items)
        self.progress = TensorProgress(tensors, "write torch_dist", enabled=self._progress_enabled)
        return plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        if write_item.type == WriteItemType.BYTE_IO:
            return data
        key = write_item.index.fqn
        if self._source is not None and not data.is_meta:
            raise CheckpointError(
                f"{key}: a source was given, but the model holds this tensor on {data.device}, not on the meta "
                "device, so its (uninitialised) values would be written; build the model for a conversion with "
                "spec='local' under torch.device('meta') (Transformer Engine modules take an explicit device)"
            )
        if data.is_meta:
            chunk = write_item.tensor_data.chunk
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if self._source is None:
                raise CheckpointError(f"{key}: the tensor is on the meta device and no source was given to read it")
            data = self._source(key, offsets, sizes)
            want = write_item.tensor_data.properties.dtype
            if tuple(data.shape) != sizes or data.dtype != want:
                raise CheckpointError(
                    f"{key} at {offsets}: source gave {tuple(data.shape)} {data.dtype}, the model expects {sizes} {want}"
                )
        if self.progress is not None:
            self.progress.update(data.nbytes)
        return data


class _BucketedWriter(FileSystemWriter):
    """torch's filesystem writer, with the plan's items written in order into files of at most
    ``file_bytes`` (its own bucketing keeps every tensor of a file alive until the file is done,
    so bounding files bounds memory)."""

    def __init__(self, path: str | Path, file_bytes: int) -> None:
        super().__init__(str(path), single_file_per_rank=True, thread_count=1)
        self.file_bytes = file_bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        buckets: list[list[WriteItem]] = [[]]
        size = 0
        for item in plan.items:
            n = _item_bytes(item)
            if buckets[-1] and size + n > self.file_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += n
        files: queue.Queue = queue.Queue()
        for i, bucket in enumerate(b for b in buckets if b):
            name = f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, files)


class StreamingSaveStrategy(SaveShardedStrategy):
    """Synchronous ``torch_dist`` (version 1) save: what megatron's default strategy writes, loaded
    by its default load strategy, with lazily materialized tensors and bounded output files."""

    def __init__(
        self, source: TensorSource | None = None, *, progress: bool = False, file_bytes: int = DEFAULT_FILE_BYTES
    ) -> None:
        super().__init__("torch_dist", 1)
        self.source = source
        self.progress = progress
        self.file_bytes = file_bytes
        self.written_bytes = 0

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: str | Path) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state = mcore_to_pyt_state_dict(state, is_loading=False)
        planner = _MaterializingPlanner(self.source, self.progress)
        try:
            dcp.save(pyt_state, storage_writer=_BucketedWriter(checkpoint_dir, self.file_bytes), planner=planner)
        finally:
            if planner.progress is not None:
                planner.progress.close()
                self.written_bytes = planner.progress.bytes


def save_sharded(
    state: dict[str, Any],
    directory: str | Path,
    *,
    source: TensorSource | None = None,
    progress: bool = False,
    file_bytes: int = DEFAULT_FILE_BYTES,
) -> int:
    """``dist_checkpointing.save`` of a (nested) sharded state dict with :class:`StreamingSaveStrategy`
    (collective: every rank calls it). Creates ``directory``; returns the bytes this rank wrote."""
    if dist.get_rank() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    strategy = StreamingSaveStrategy(source, progress=progress, file_bytes=file_bytes)
    dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)
    return strategy.written_bytes


def save_model_checkpoint(
    model: torch.nn.Module,
    ckpt_dir: str | Path,
    hf_config: Any,
    *,
    iteration: int = 0,
    hf_dir: str | Path | None = None,
    source: TensorSource | None = None,
    progress: bool = False,
) -> int:
    """Write ``model`` (every rank its part) as ``ckpt_dir/iter_XXXXXXX`` with ``hf/`` metadata
    (tokenizer and generation config copied from ``hf_dir``) and the tracker file, written last.

    ``source`` supplies tensors of a model built on the ``meta`` device. Collective; returns the
    bytes this rank wrote.
    """
    ckpt_dir = Path(ckpt_dir)
    state = {
        "model": model_sharded_state_dict(model),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "args": megatron_args(model, hf_config),
    }
    written = save_sharded(state, ckpt_dir / iter_dir_name(iteration), source=source, progress=progress)
    if dist.get_rank() == 0:
        dtype = unwrap_model(model).config.params_dtype
        write_hf_metadata(ckpt_dir / HF_SUBDIR, hf_config, source_dir=hf_dir, dtype=dtype)
        write_tracker(ckpt_dir, iteration)
    dist.barrier()
    return written


# ---- loading ----


def load_sharded(sharded: dict[str, Any], iter_dir: str | Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` of ``sharded`` from one iteration directory (collective).

    Transformer Engine's ``_extra_state`` entries (FP8 metadata) the checkpoint lacks are left out:
    a checkpoint of the local spec, or of ``opd convert``, loads into a TE model. Any other tensor
    the checkpoint lacks is a :class:`CheckpointError`."""
    allow_checkpoint_args()
    try:
        loaded, _, absent = dist_checkpointing.load(sharded, str(iter_dir), strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # torch's is a BaseException
        raise CheckpointError(f"{iter_dir}: loading failed ({e}); is it a complete checkpoint of this model?") from e
    missing_tensors = sorted(k for k in absent if not k.endswith(EXTRA_STATE_SUFFIX))
    if missing_tensors:
        raise CheckpointError(
            f"{iter_dir}: the checkpoint lacks {len(missing_tensors)} tensors of the model, e.g. {missing_tensors[:3]}; "
            "was it written for another architecture?"
        )
    return loaded


def load_state_into(model: torch.nn.Module, state: dict[str, Any], iter_dir: str | Path) -> None:
    """``model.load_state_dict(state)``, where only ``_extra_state`` entries may be absent."""
    result = unwrap_model(model).load_state_dict(state, strict=False)
    not_loaded = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if not_loaded or result.unexpected_keys:
        raise CheckpointError(
            f"{iter_dir}: state does not fit the model: {not_loaded[:3]} {result.unexpected_keys[:3]}"
        )


def load_model_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> int:
    """Load a checkpoint (root or iteration dir, written at any TP/PP/EP, with either spec) into this
    rank's part of ``model``; returns its iteration. Collective. Raises :class:`CheckpointError`
    when a tensor of the model is not in the checkpoint."""
    iter_dir = checkpoint_iter_dir(ckpt_dir)
    loaded = load_sharded({"model": model_sharded_state_dict(model)}, iter_dir)
    load_state_into(model, loaded["model"], iter_dir)
    return int(loaded.get("iteration", 0))
