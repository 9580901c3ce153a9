"""Sampled-token log-probs, entropy and log-probs at given ids over a vocab-sharded row, with autograd
(docs/objectives.md §1-§5: ``ℓ_S``, entropy, and the student's ``log p`` on a top-K support), and its float64
reference.

Forward reads the logits shard once (``vocab_parallel.shard_pass``: the backend's ``row_stats`` and the reduction
over the TP group) and returns full-vocab-normalized values. Saved for backward: the logits (the caller's tensor, no
copy), labels/ids and three fp32 scalars per row (max, log-sum, H). Backward reads the logits once more and writes
dlogits in their dtype; it needs no collective, as every rank holds the same outputs and hence the same upstream
gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels.backend import backend_for
from megatron_opd.kernels.inputs import check_ids, check_index, check_logits, check_temperature
from megatron_opd.kernels.vocab_parallel import Targets, shard_pass, vocab_shard


class TokenLogprobs(NamedTuple):
    """Per-row results of :func:`token_logprobs`; all fp32 and differentiable w.r.t. the logits."""

    label_logprob: Tensor  # [N] log p(label); 0 where the label is negative (ignored)
    entropy: Tensor  # [N] entropy of the full-vocab distribution
    ids_logprob: Tensor | None  # [N, K] log p at the given global ids; 0 where an id is negative


def backward_coefficients(
    stats: Tensor, targets: Targets, g_label: Tensor | None, g_entropy: Tensor | None, g_ids: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``(row_vals [N, 6], g_ids [N, K] | None)`` for the backend's ``grad_logits`` from the saved ``stats [N, 3]``
    (max of z, log-sum, entropy) and the upstream gradients (``None``: unused output); ignored labels/ids get no
    gradient."""
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


class TokenLogprobsFunction(torch.autograd.Function):
    """``(label log-prob, entropy, ids log-prob)`` of a logits shard; see :func:`token_logprobs`."""

    @staticmethod
    def forward(ctx, logits, labels, ids, inv_temp, tp_group, vocab_start):
        shard = vocab_shard(logits.shape[1], tp_group, vocab_start)
        targets = Targets.of(labels, ids, shard)
        backend = backend_for(logits)
        scores = shard_pass(logits, targets, shard, inv_temp, backend)
        ctx.save_for_backward(logits, *targets, scores.stats.saved())
        ctx.inv_temp, ctx.backend = inv_temp, backend
        return scores.label_logprob, scores.stats.entropy, scores.ids_logprob

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
    check_index("labels", labels, (logits.shape[0],), logits)
    check_ids(ids, logits.shape[0], logits)
    label_lp, entropy, ids_lp = TokenLogprobsFunction.apply(
        logits, labels.contiguous(), None if ids is None else ids.contiguous(), inv_temp, tp_group, vocab_start
    )
    return TokenLogprobs(label_lp, entropy, None if ids is None else ids_lp)


def _gather_or_zero(logp: Tensor, cols: Tensor) -> Tensor:
    vals = logp.gather(1, cols.clamp(min=0))
    return torch.where(cols >= 0, vals, torch.zeros_like(vals))


def token_logprobs_reference(
    logits: Tensor, labels: Tensor, ids: Tensor | None = None, *, temperature: float = 1.0, dtype=torch.float64
) -> TokenLogprobs:
    """:func:`token_logprobs` the straightforward way over the full vocabulary (tests and benchmarks only: it builds
    ``[N, V]`` tensors in ``dtype``): ``log_softmax(logits.to(dtype) / temperature)``, then gathers; differentiable."""
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)  # 0·log 0 = 0, with a zero gradient
    label = _gather_or_zero(logp, labels.unsqueeze(1)).squeeze(1)
    return TokenLogprobs(label, entropy, None if ids is None else _gather_or_zero(logp, ids))
