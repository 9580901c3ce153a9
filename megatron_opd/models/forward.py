"""Forward passes of a (possibly pipeline-parallel) GPTModel through megatron's schedules, to its logits or, for
the fused LM head, to the hidden states its output layer would read and that layer's weight."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from megatron_opd.convert.load import unwrap_model


def run_schedule(
    model: torch.nn.Module,
    microbatches: Sequence[Any],
    step_fn: Callable[[torch.nn.Module, Any], tuple[Tensor, Callable | None]],
    *,
    forward_only: bool,
    shape: tuple[int, int] | None = None,
) -> list[Any]:
    """Run ``step_fn`` over ``microbatches`` with megatron's (pipelined) schedule.

    ``step_fn(model, mb)`` returns ``(output, loss_fn)`` like a megatron forward step; the
    ``loss_fn``'s second return value is collected. ``shape`` = (micro batch size, sequence length)
    sizes the pipeline's P2P buffers when the model's config does not set ``variable_seq_lengths``
    (default: from ``mb.input_ids`` of the first micro-batch). Returns what the last stage's loss
    functions returned (or the raw outputs when ``loss_fn`` is None); other stages get [].
    """
    if shape is None:
        first = microbatches[0]["input_ids"] if isinstance(microbatches[0], dict) else microbatches[0].input_ids
        shape = (first.shape[0], first.shape[1])
    it: Iterator[Any] = iter(microbatches)

    def forward_step(data_iterator: Iterator[Any], m: torch.nn.Module) -> tuple[Tensor, Callable | None]:
        return step_fn(m, next(data_iterator))

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=it,
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )


@contextlib.contextmanager
def without_output_layer(model: torch.nn.Module) -> Iterator[None]:
    """Inside: the model's forward returns, on the last pipeline stage too, the final hidden states ``[s, b, h]``
    (after the final norm; sequence-parallel shards when ``sequence_parallel``) instead of its logits: megatron's
    ``GPTModel._postprocess`` returns its input before the output layer where ``post_process`` is off (the
    decoder's final norm belongs to the decoder and keeps its own setting)."""
    gpt = unwrap_model(model)
    post_process = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = post_process


def model_forward(model: torch.nn.Module, mb: dict[str, Tensor], *, hidden: bool = False) -> Tensor:
    """GPTModel forward on one microbatch: ``input_ids``, optional ``position_ids``, optional
    ``attention_mask`` (megatron convention: True = masked) or ``packed_seq_params``. The logits
    ``[b, s, V/TP]`` on the last stage or, with ``hidden``, the output layer's input (:func:`without_output_layer`,
    read it with :func:`output_layer_input`)."""
    ids = mb["input_ids"]
    pos = mb.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    with without_output_layer(model) if hidden else contextlib.nullcontext():
        return model(ids, pos, attention_mask=mb.get("attention_mask"), packed_seq_params=mb.get("packed_seq_params"))


def output_layer_input(model: torch.nn.Module, hidden: Tensor) -> Tensor:
    """The last stage's final hidden states ``[s, b, h]`` (:func:`without_output_layer`) as the output layer reads
    them, batch first: ``[b, s, h]``, the same on every TP rank. Under sequence parallelism the shards are gathered
    first (as ``ColumnParallelLinear`` does); the gather's backward takes this rank's rows of a gradient the fused
    LM head has already summed over the TP group (``kernels.linear``)."""
    gpt = unwrap_model(model)
    if gpt.output_layer.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=gpt.output_layer.tp_group
        )
    return hidden.transpose(0, 1)


def output_weight(model: torch.nn.Module) -> Tensor:
    """The LM head's weight ``[V/TP, h]`` on the last stage, as ``GPTModel._postprocess`` uses it: the word
    embedding when input and output embeddings are tied (on a single stage; the last stage of a pipeline keeps its
    own copy in ``output_layer``, which megatron keeps in sync), else the output layer's."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@torch.no_grad()
def forward_logits(model: torch.nn.Module, input_ids: Tensor, **extra: Tensor) -> Tensor | None:
    """Vocab-parallel logits [b, s, V/TP] on the last pipeline stage, ``None`` elsewhere."""
    outs = run_schedule(
        model,
        [{"input_ids": input_ids, **extra}],
        lambda m, mb: (model_forward(m, mb), None),
        forward_only=True,
    )
    return outs[0] if outs else None
