"""Forward passes of a (possibly pipeline-parallel) GPTModel through megatron's schedules."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor


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


def model_forward(model: torch.nn.Module, mb: dict[str, Tensor]) -> Tensor:
    """GPTModel forward on one microbatch: ``input_ids``, optional ``position_ids``, optional
    ``attention_mask`` (megatron convention: True = masked) or ``packed_seq_params``."""
    ids = mb["input_ids"]
    pos = mb.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    return model(ids, pos, attention_mask=mb.get("attention_mask"), packed_seq_params=mb.get("packed_seq_params"))


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
