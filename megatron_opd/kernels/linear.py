"""Token log-probs straight from hidden states and this rank's LM-head shard, with autograd (docs/objectives.md §1-§5):
no ``[N, V_local]`` logits tensor exists beyond one chunk, in forward or backward; and its float64 reference.

Forward, per chunk of ``chunk_tokens`` rows: ``z = h @ W_shardᵀ`` in the input dtype (as Megatron's output layer
computes it), one pass of the backend over ``z`` and the chunk's TP reduction; the chunk's logits are dropped.
Saved for backward: ``h``, ``W`` (the caller's tensors) and three fp32 scalars per row.

Backward, per chunk of ``chunk_columns`` vocabulary columns (all rows): the chunk's logits recomputed, their gradient
written over them by the backend's one-pass ``grad_logits`` (the saved row scalars are full-vocab, so a column chunk
needs nothing from the others), then ``dW[chunk] = dzᵀ @ h`` — each slice of the weight gradient is one GEMM over
all tokens, rounded once — and ``dh += dz @ W[chunk]`` in fp32. Chunking the backward by columns keeps the
accumulator at ``N x H`` instead of the weight's ``V_local x H`` (4.6x smaller at N = 32K, V = 151,936).

``hidden`` is the full (not sequence-parallel) input of the output layer on every TP rank; its gradient is summed
over ``tp_group`` here, as Megatron's ColumnParallelLinear does for its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels.backend import VocabBackend, backend_for
from megatron_opd.kernels.inputs import check_chunk, check_linear
from megatron_opd.kernels.token_logprobs import TokenLogprobs, backward_coefficients, token_logprobs_reference
from megatron_opd.kernels.vocab_parallel import (
    ShardScores,
    Targets,
    VocabShard,
    cat_scores,
    check_owned,
    shard_pass,
    vocab_shard,
)

CHUNK_LOGIT_BYTES = 1 << 28  # logits of one chunk: 256 MiB (e.g. 883 tokens x 151,936 or 32K x 4,096 in bf16)


def chunks(n: int, step: int) -> list[slice]:
    """Consecutive slices of at most ``step`` of ``range(n)``; one empty slice when ``n`` is 0 (a rank's
    micro-batch without response tokens still takes part in the TP collectives)."""
    return [slice(r0, min(r0 + step, n)) for r0 in range(0, n, step)] or [slice(0, 0)]


def default_chunk(other: int, elem: int, align: int = 1, budget: int = CHUNK_LOGIT_BYTES) -> int:
    """Rows or columns per chunk so that a chunk of logits is at most ``budget`` bytes, a multiple of ``align`` when
    that many fit."""
    step = max(1, budget // max(1, other * elem))
    return step - step % align if step >= align else step


def score_chunks(
    hidden: Tensor,
    weight: Tensor,
    targets: Targets,
    shard: VocabShard,
    inv_temp: float,
    backend: VocabBackend,
    chunk_tokens: int,
    topk: int = 0,
) -> ShardScores:
    """``shard_pass`` over ``hidden @ weight.T`` one chunk of rows at a time, with one vocabulary-range check."""
    parts = []
    for rows in chunks(hidden.shape[0], chunk_tokens):
        logits = hidden[rows] @ weight.t()
        parts.append(shard_pass(logits, targets.rows(rows), shard, inv_temp, backend, topk, check=False))
        del logits
    scores = cat_scores(parts)
    check_owned(scores.stats.owned, targets.expected, shard)
    return scores


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """``(label log-prob, entropy, ids log-prob)`` of ``hidden @ weight.T``; see :func:`linear_token_logprobs`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ids, inv_temp, tp_group, vocab_start, chunk_tokens, chunk_columns):
        shard = vocab_shard(weight.shape[0], tp_group, vocab_start)
        targets = Targets.of(labels, ids, shard)
        backend = backend_for(hidden)
        scores = score_chunks(hidden, weight, targets, shard, inv_temp, backend, chunk_tokens)
        ctx.save_for_backward(hidden, weight, *targets, scores.stats.saved())
        ctx.inv_temp, ctx.backend, ctx.shard = inv_temp, backend, shard
        ctx.chunk_columns = chunk_columns or default_chunk(hidden.shape[0], hidden.element_size(), align=128)
        return scores.label_logprob, scores.stats.entropy, scores.ids_logprob

    @staticmethod
    def backward(ctx, g_label, g_entropy, g_ids):
        hidden, weight, *target_tensors, saved = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        targets = Targets(*target_tensors)
        row_vals, g_ids = backward_coefficients(saved, targets, g_label, g_entropy, g_ids)
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        d_weight = torch.empty_like(weight) if want_w else None
        for cols in chunks(weight.shape[0], ctx.chunk_columns):
            part = VocabShard(None, 1, cols.start, cols.stop - cols.start)  # this chunk's columns of the shard
            labels_c = part.localize(targets.labels_local)
            ids_c = None if targets.ids_local is None else part.localize(targets.ids_local)
            logits = hidden @ weight[cols].t()
            d_logits = ctx.backend.grad_logits(logits, labels_c, ids_c, row_vals, g_ids, ctx.inv_temp, out=logits)
            if want_w:
                torch.mm(d_logits.t(), hidden, out=d_weight[cols])
            if want_h:
                d_hidden += d_logits @ weight[cols]  # rounded once per chunk, summed in fp32
            del logits, d_logits
        if want_h:
            d_hidden = ctx.shard.all_reduce(d_hidden, dist.ReduceOp.SUM).to(hidden.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    tp_group: ProcessGroup | None = None,
    vocab_start: int | None = None,
    chunk_tokens: int | None = None,
    chunk_columns: int | None = None,
) -> TokenLogprobs:
    """``token_logprobs`` of ``logits = hidden @ weight.T`` without materializing the logits.

    ``hidden [N, H]`` (the same on every TP rank), ``weight [V_local, H]`` this rank's LM-head shard, same dtype;
    ``labels``/``ids``/``temperature``/``tp_group``/``vocab_start`` as in ``token_logprobs``. Differentiable
    w.r.t. ``hidden`` (summed over ``tp_group``) and ``weight``. Forward takes ``chunk_tokens`` rows at a time,
    backward ``chunk_columns`` vocabulary columns (defaults: logits of at most 256 MiB per chunk).
    """
    inv_temp = check_linear(hidden, weight, labels, ids, temperature, chunk_tokens)
    check_chunk("chunk_columns", chunk_columns)
    label_lp, entropy, ids_lp = LinearTokenLogprobsFunction.apply(
        hidden,
        weight,
        labels.contiguous(),
        None if ids is None else ids.contiguous(),
        inv_temp,
        tp_group,
        vocab_start,
        chunk_tokens or default_chunk(weight.shape[0], weight.element_size()),
        chunk_columns,
    )
    return TokenLogprobs(label_lp, entropy, None if ids is None else ids_lp)


def linear_token_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    dtype=torch.float64,
) -> TokenLogprobs:
    """``token_logprobs_reference`` of the materialized logits ``hidden @ weight.T``, computed in the inputs' dtype
    as the output layer does (tests and benchmarks only); differentiable."""
    return token_logprobs_reference(hidden @ weight.t(), labels, ids, temperature=temperature, dtype=dtype)
