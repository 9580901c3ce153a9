"""HF safetensors -> Megatron-Core ``torch_dist`` checkpoint, streaming.

Design: a world of TP x PP x DP ranks (DP the smallest that holds EP x ETP expert ranks) is
spawned on this host. Each rank builds its part of the model with the local spec on the ``meta``
device (no memory; no Transformer Engine needed, whatever the node has),
takes megatron's own sharded state dict of it (so keys, global shapes, chunking and replica
de-duplication are exactly what a training run at that layout writes) and saves it with
:class:`~megatron_opd.convert.mcore_io.StreamingSaveStrategy`: each chunk is read from the HF files
(:class:`HFTensorSource`) only when the writer reaches it. Memory per rank: the process, one
tensor group and one output file (<= 512 MiB), whatever the model size.

The checkpoint is layout-independent (it holds global tensors) and loads at any TP/PP/EP; the
layout chosen here sets its chunking, so loading at that layout reads each chunk exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from megatron_opd.convert.hf_io import CheckpointError, HFCheckpointReader, load_hf_config
from megatron_opd.convert.mapping import AttentionShape, ParamMapping, expected_hf_names, hf_to_shard, parse_sharded_key
from megatron_opd.convert.outdir import atomic_output_dir, check_output
from megatron_opd.convert.progress import ConversionReport, peak_rss_bytes
from megatron_opd.platform.distributed import ParallelSizes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class HFTensorSource:
    """Chunks of Megatron checkpoint tensors read from an HF checkpoint.

    The global tensor of a key at one layer / expert is the TP=1 Megatron parameter built from
    its HF tensors; a chunk is a slice of it. The last global tensor is kept, so the chunks of one
    parameter (e.g. the gate and up halves of ``linear_fc1``) read the HF files once.
    """

    def __init__(self, hf_dir: str | Path, hf_config: Any, dtype: torch.dtype) -> None:
        self.reader = HFCheckpointReader(hf_dir)
        self.attn = AttentionShape.of(hf_config)
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.dtype = dtype
        self._last: tuple[ParamMapping, torch.Tensor] | None = None

    def _global(self, mapping: ParamMapping) -> torch.Tensor:
        if self._last is None or self._last[0] != mapping:
            self._last = None  # free the previous one first
            hf = [self.reader.get(name) for name in mapping.hf]
            self._last = (mapping, hf_to_shard(mapping.kind, hf, 0, 1, self.attn).to(self.dtype))
        return self._last[1]

    def __call__(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        sharded = parse_sharded_key(key)
        n = sharded.prepended
        if any(s != 1 for s in sizes[:n]):
            raise CheckpointError(f"{key}: chunk {sizes} spans several layers/experts")
        mapping = sharded.mapping(offsets[:n], tie_word_embeddings=self.tied)
        full = self._global(mapping)
        index = tuple(slice(o, o + s) for o, s in zip(offsets[n:], sizes[n:]))
        return full[index].reshape(sizes)


def layout_world_size(sizes: ParallelSizes) -> int:
    """Ranks of the smallest world with this layout: TP x PP x DP, DP the least with EP x ETP | TP x DP
    (ETP defaults to TP, as in megatron)."""
    tp, pp, ep = sizes.tensor_model_parallel_size, sizes.pipeline_model_parallel_size, sizes.expert_model_parallel_size
    etp = sizes.expert_tensor_parallel_size or tp
    dp = 1
    while (tp * dp) % (ep * etp):
        dp += 1
    return tp * pp * dp


def check_layout(hf_config: Any, sizes: ParallelSizes) -> None:
    """Raise :class:`CheckpointError` when the layout cannot split this model."""
    from megatron_opd.models.qwen3 import moe_layer_pattern, num_experts

    tp, pp, ep = sizes.tensor_model_parallel_size, sizes.pipeline_model_parallel_size, sizes.expert_model_parallel_size
    etp = sizes.expert_tensor_parallel_size or tp
    for name, value in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--etp", etp)):
        if value < 1:
            raise CheckpointError(f"{name}={value}: parallel sizes must be >= 1")
    experts = num_experts(hf_config)
    checks = [
        (hf_config.num_attention_heads, tp, "num_attention_heads", "--tp"),
        (hf_config.num_key_value_heads, tp, "num_key_value_heads", "--tp"),
        (hf_config.vocab_size, tp, "vocab_size", "--tp"),
        (hf_config.num_hidden_layers, pp, "num_hidden_layers", "--pp"),
    ]
    if not all(moe_layer_pattern(hf_config)):
        checks.append((hf_config.intermediate_size, tp, "intermediate_size", "--tp"))
    if experts:
        checks += [
            (experts, ep, "num_experts", "--ep"),
            (hf_config.moe_intermediate_size, etp, "moe_intermediate_size", "--etp"),
        ]
    elif ep > 1:
        raise CheckpointError(f"--ep={ep}: expert parallelism needs an MoE model; {hf_config.model_type} is dense")
    for total, parts, field, flag in checks:
        if total % parts:
            raise CheckpointError(f"{flag}={parts} does not divide {field}={total}; choose a divisor of {total}")


def check_hf_input(hf_dir: str | Path) -> Any:
    """Validate an HF input dir before any work: a Qwen3 / Qwen3-MoE config and every shard
    readable with exactly the expected tensors. Returns its config."""
    from megatron_opd.models.qwen3 import ModelConfigError, check_supported

    hf_config = load_hf_config(hf_dir)
    try:
        check_supported(hf_config)
    except ModelConfigError as e:
        raise CheckpointError(f"{hf_dir}: {e}") from e
    HFCheckpointReader(hf_dir).validate(expected_hf_names(hf_config))
    return hf_config


def write_from_hf(
    hf_dir: str, ckpt_dir: str, sizes: ParallelSizes, dtype: torch.dtype | None, iteration: int, progress: bool
) -> tuple[int, int]:
    """On every rank of an initialized world: write ``hf_dir`` as a checkpoint in ``ckpt_dir`` at
    layout ``sizes``. Returns (bytes written, peak RSS) of this rank."""
    import torch.distributed as dist

    from megatron_opd.convert.mcore_io import save_model_checkpoint
    from megatron_opd.models.qwen3 import build_gpt_model
    from megatron_opd.platform.distributed import init_model_parallel

    init_model_parallel(sizes)
    hf_config = load_hf_config(hf_dir)
    source_dtype = HFCheckpointReader(hf_dir).dtype("model.embed_tokens.weight")
    dtype = dtype or source_dtype
    # The local spec: its modules allocate on the default (meta) device and its checkpoint keys are the
    # TE spec's (without TE's `_extra_state`, which loads leave as they are). Transformer Engine's modules
    # take an explicit device ("cpu" here) and would hold real, uninitialised tensors.
    with torch.device("meta"):
        model = build_gpt_model(
            hf_config, spec="local", params_dtype=dtype, perform_initialization=False, use_cpu_initialization=True
        )
    source = HFTensorSource(hf_dir, hf_config, dtype)
    show = progress and dist.get_rank() == 0
    written = save_model_checkpoint(
        model, ckpt_dir, hf_config, iteration=iteration, hf_dir=hf_dir, source=source, progress=show
    )
    return written, peak_rss_bytes()


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    *,
    sizes: ParallelSizes | None = None,
    dtype: torch.dtype | None = None,
    iteration: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert an HF Qwen3 / Qwen3-MoE directory into a Megatron checkpoint at ``out`` (written to a
    temporary directory, renamed at the end) at layout ``sizes`` (default TP=PP=EP=1). ``dtype``
    None keeps the HF checkpoint's."""
    from megatron_opd.platform.spawn import spawn_world

    start = time.monotonic()
    sizes = sizes or ParallelSizes()
    check_output(out, overwrite=overwrite, inputs=(hf_dir,))
    hf_config = check_hf_input(hf_dir)
    check_layout(hf_config, sizes)
    world = layout_world_size(sizes)
    with atomic_output_dir(out, overwrite=overwrite, inputs=(hf_dir,)) as tmp:
        results = spawn_world(write_from_hf, world, str(hf_dir), str(tmp), sizes, dtype, iteration, progress)
    rss = {"main": peak_rss_bytes(), **{f"rank{r}": res[1] for r, res in enumerate(results)}}
    return ConversionReport(
        tensors=len(expected_hf_names(hf_config)),
        bytes=sum(res[0] for res in results),
        seconds=time.monotonic() - start,
        peak_rss=rss,
    )
