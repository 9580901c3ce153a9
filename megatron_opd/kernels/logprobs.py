"""Sampled-token log-probs, entropy and log-probs at given ids over a vocab-sharded row, with autograd
(OBJECTIVES.md §1-§5: ``ℓ_S``, entropy, and the student's ``log p`` on a top-K support).

Forward reads the logits shard once (``dispatch.backend_for(...).row_stats``), reduces the per-row statistics over
the TP group (``vocab_parallel.reduce_row_stats``) and returns full-vocab-normalized values. Saved for backward:
the logits (the caller's tensor, no copy), labels/ids and three fp32 scalars per row (max, log-sum, H). Backward reads the
logits once more and writes dlogits in their dtype; it needs no collective, as every rank holds the same outputs
and hence the same upstream gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.config.errors import ConfigError
from megatron_opd.kernels.dispatch import backend_for
from megatron_opd.kernels.vocab_parallel import reduce_row_stats, vocab_shard


class TokenLogprobs(NamedTuple):
    """Per-row results of :func:`token_logprobs`; all fp32 and differentiable w.r.t. the logits."""

    label_logprob: Tensor  # [N] log p(label); 0 where the label is negative (ignored)
    entropy: Tensor  # [N] entropy of the full-vocab distribution
    ids_logprob: Tensor | None  # [N, K] log p at the given global ids; 0 where an id is negative


def check_temperature(temperature: float) -> float:
    """``1 / temperature``; raises unless ``temperature`` is a finite positive number."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError("temperature", temperature, "must be a finite number > 0.", "use the rollout temperature.")
    return 1.0 / float(temperature)


def check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ConfigError(
            "logits", tuple(logits.shape), "must be [N, V_local] with V_local > 0.", "flatten to [tokens, vocab]."
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError("logits", logits.dtype, "unsupported dtype.", "pass bf16, fp16 or fp32 logits.")


def _check_index(name: str, t: Tensor, shape: tuple[int, ...], logits: Tensor) -> None:
    if t.dtype != torch.int64 or tuple(t.shape) != shape or t.device != logits.device:
        raise ConfigError(
            name,
            f"{t.dtype} {tuple(t.shape)} on {t.device}",
            f"must be int64 of shape {shape} on {logits.device}.",
            f"pass {name} as global token ids, e.g. {name}.long().to(logits.device).",
        )


class _TokenLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ids, inv_temp, tp_group, vocab_start):
        shard = vocab_shard(logits, tp_group, vocab_start)
        labels_local = shard.localize(labels)
        ids_local = None if ids is None else shard.localize(ids)
        backend = backend_for(logits)
        local, _, _ = backend.row_stats(logits, labels_local, ids_local, inv_temp, 0)
        owned = (labels_local >= 0).to(torch.int64)
        expected = (labels >= 0).to(torch.int64)
        if ids is not None:
            owned = owned + (ids_local >= 0).sum(1)
            expected = expected + (ids >= 0).sum(1)
        stats = reduce_row_stats(local, shard, owned, expected)
        label_valid = labels >= 0
        label_lp = torch.where(label_valid, stats.logprob(stats.label_x), torch.zeros_like(stats.label_x))
        if ids is None:
            ids_lp = stats.label_x.new_zeros(labels.shape[0], 0)
        else:
            ids_lp = torch.where(ids >= 0, stats.logprob(stats.ids_x), torch.zeros_like(stats.ids_x))
        ctx.save_for_backward(
            logits, labels_local, ids_local, label_valid, ids, stats.row_max, stats.log_sum, stats.entropy
        )
        ctx.inv_temp = inv_temp
        ctx.backend = backend
        return label_lp, stats.entropy, ids_lp

    @staticmethod
    def backward(ctx, g_label, g_entropy, g_ids):
        logits, labels_local, ids_local, label_valid, ids, row_max, log_sum, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        zeros = torch.zeros_like(entropy)
        g_label = zeros if g_label is None else torch.where(label_valid, g_label.float(), zeros)
        g_entropy = zeros if g_entropy is None else g_entropy.float()
        g_all = g_label
        if ids is not None:
            g_ids = torch.zeros_like(ids, dtype=torch.float32) if g_ids is None else g_ids.float()
            g_ids = torch.where(ids >= 0, g_ids, torch.zeros_like(g_ids))
            g_all = g_all + g_ids.sum(1)
        else:
            g_ids = None
        row_vals = torch.stack([row_max, log_sum, entropy, g_all, g_entropy, g_label], dim=1).contiguous()
        grad = ctx.backend.grad_logits(logits, labels_local, ids_local, row_vals, g_ids, ctx.inv_temp)
        return grad, None, None, None, None, None


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    tp_group: ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> TokenLogprobs:
    """Full-vocab log p(labels), entropy and log p(ids) under ``log_softmax(logits / temperature)``.

    ``logits`` is this TP rank's vocab shard ``[N, V_local]`` (bf16/fp16/fp32); rank ``r`` owns global ids
    ``[r·V_local, (r+1)·V_local)`` unless ``vocab_start`` says otherwise. ``labels [N]`` and ``ids [N, K]`` are int64
    global ids; negative ones are ignored (value 0, no gradient). All outputs are differentiable w.r.t. ``logits``
    and identical on every rank of ``tp_group`` (``None``: no tensor parallelism). Nothing of size N x V_local is kept
    for backward besides ``logits`` itself, and no fp32 N x V_local tensor is built.
    """
    check_logits(logits)
    inv_temp = check_temperature(temperature)
    n = logits.shape[0]
    _check_index("labels", labels, (n,), logits)
    if ids is not None:
        if ids.dim() != 2:
            raise ConfigError("ids", tuple(ids.shape), "must be [N, K].", "pass one row of K global ids per token.")
        _check_index("ids", ids, (n, ids.shape[1]), logits)
    label_lp, entropy, ids_lp = _TokenLogprobsFn.apply(
        logits, labels.contiguous(), None if ids is None else ids.contiguous(), inv_temp, tp_group, vocab_start
    )
    return TokenLogprobs(label_lp, entropy, None if ids is None else ids_lp)
