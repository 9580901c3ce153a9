"""Sampled-token log-probs, entropy and log-probs at given ids over a vocab-sharded row, with autograd
(OBJECTIVES.md §1-§5: ``ℓ_S``, entropy, and the student's ``log p`` on a top-K support).

Forward reads the logits shard once (``dispatch.backend_for(...).row_stats``), reduces the per-row statistics over
the TP group (``vocab_parallel.reduce_row_stats``) and returns full-vocab-normalized values. Saved for backward:
the logits (the caller's tensor, no copy), labels/ids and three fp32 scalars per row (max, log-sum, H). Backward
reads the logits once more and writes dlogits in their dtype; it needs no collective, as every rank holds the same
outputs and hence the same upstream gradients.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.config.errors import ConfigError
from megatron_opd.kernels.dispatch import backend_for
from megatron_opd.kernels.vocab_parallel import RowStats, VocabShard, reduce_row_stats, vocab_shard


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


def check_index(name: str, t: Tensor, shape: tuple[int, ...], logits: Tensor) -> None:
    if t.dtype != torch.int64 or tuple(t.shape) != shape or t.device != logits.device:
        raise ConfigError(
            name,
            f"{t.dtype} {tuple(t.shape)} on {t.device}",
            f"must be int64 of shape {shape} on {logits.device}.",
            f"pass {name} as global token ids, e.g. {name}.long().to(logits.device).",
        )


class Targets(NamedTuple):
    """Labels/ids in global ids and as columns of this rank's shard (-1: not owned), with per-row ownership counts
    for the out-of-vocabulary check of ``reduce_row_stats``."""

    labels: Tensor  # [N]
    ids: Tensor | None  # [N, K]
    labels_local: Tensor
    ids_local: Tensor | None
    owned: Tensor  # [N] labels/ids this rank owns
    expected: Tensor  # [N] non-negative labels/ids

    @staticmethod
    def of(labels: Tensor, ids: Tensor | None, shard: VocabShard) -> Targets:
        labels_local = shard.localize(labels)
        ids_local = None if ids is None else shard.localize(ids)
        owned = (labels_local >= 0).to(torch.int64)
        expected = (labels >= 0).to(torch.int64)
        if ids is not None:
            owned = owned + (ids_local >= 0).sum(1)
            expected = expected + (ids >= 0).sum(1)
        return Targets(labels, ids, labels_local, ids_local, owned, expected)

    def rows(self, sl: slice) -> Targets:
        return Targets(*(None if t is None else t[sl] for t in self))


def shard_forward(
    logits: Tensor, targets: Targets, shard: VocabShard, inv_temp: float, backend: ModuleType
) -> tuple[RowStats, Tensor, Tensor]:
    """One pass over the shard + the TP reduction: (stats, label log-prob [N], ids log-prob [N, K] or [N, 0])."""
    local, _, _ = backend.row_stats(logits, targets.labels_local, targets.ids_local, inv_temp, 0)
    stats = reduce_row_stats(local, shard, targets.owned, targets.expected)
    label_lp = torch.where(targets.labels >= 0, stats.logprob(stats.label_x), torch.zeros_like(stats.label_x))
    if targets.ids is None:
        ids_lp = stats.label_x.new_zeros(targets.labels.shape[0], 0)
    else:
        ids_lp = torch.where(targets.ids >= 0, stats.logprob(stats.ids_x), torch.zeros_like(stats.ids_x))
    return stats, label_lp, ids_lp


def backward_coefficients(
    stats: Tensor, targets: Targets, g_label: Tensor | None, g_entropy: Tensor | None, g_ids: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``(row_vals [N, 6], g_ids [N, K] | None)`` for ``grad_logits`` from the saved ``stats [N, 3]`` (max, log-sum,
    entropy) and the upstream gradients (``None``: unused output); ignored labels/ids get no gradient."""
    zeros = torch.zeros_like(stats[:, 0])
    g_label = zeros if g_label is None else torch.where(targets.labels >= 0, g_label.float(), zeros)
    g_entropy = zeros if g_entropy is None else g_entropy.float()
    g_all = g_label
    if targets.ids is None:
        g_ids = None
    else:
        g_ids = torch.zeros_like(targets.ids, dtype=torch.float32) if g_ids is None else g_ids.float()
        g_ids = torch.where(targets.ids >= 0, g_ids, torch.zeros_like(g_ids))
        g_all = g_all + g_ids.sum(1)
    return torch.cat([stats, torch.stack([g_all, g_entropy, g_label], dim=1)], dim=1).contiguous(), g_ids


class _TokenLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ids, inv_temp, tp_group, vocab_start):
        shard = vocab_shard(logits, tp_group, vocab_start)
        targets = Targets.of(labels, ids, shard)
        backend = backend_for(logits)
        stats, label_lp, ids_lp = shard_forward(logits, targets, shard, inv_temp, backend)
        ctx.save_for_backward(logits, *targets, stats.saved())
        ctx.inv_temp, ctx.backend = inv_temp, backend
        return label_lp, stats.entropy, ids_lp

    @staticmethod
    def backward(ctx, g_label, g_entropy, g_ids):
        logits, *target_tensors, saved = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        targets = Targets(*target_tensors)
        row_vals, g_ids = backward_coefficients(saved, targets, g_label, g_entropy, g_ids)
        grad = ctx.backend.grad_logits(logits, targets.labels_local, targets.ids_local, row_vals, g_ids, ctx.inv_temp)
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
    check_index("labels", labels, (n,), logits)
    if ids is not None:
        if ids.dim() != 2:
            raise ConfigError("ids", tuple(ids.shape), "must be [N, K].", "pass one row of K global ids per token.")
        check_index("ids", ids, (n, ids.shape[1]), logits)
    label_lp, entropy, ids_lp = _TokenLogprobsFn.apply(
        logits, labels.contiguous(), None if ids is None else ids.contiguous(), inv_temp, tp_group, vocab_start
    )
    return TokenLogprobs(label_lp, entropy, None if ids is None else ids_lp)
