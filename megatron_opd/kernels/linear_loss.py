"""A loss over token log-probs straight from hidden states and this rank's LM-head shard, with its gradient computed
during the forward (docs/objectives.md §1-§5; Liger-Kernel's fused linear cross entropy, generalized to any loss that
sums a function of each row's log-prob, entropy and ids log-probs); and its float64 reference.

Per chunk of ``chunk_tokens`` rows: ``z = h @ W_shardᵀ``, the backend's one pass and the chunk's TP reduction give the
rows' outputs; ``row_loss`` of those outputs and its gradient w.r.t. them (autograd on ``[rows]``-sized tensors) give
the upstream gradients; the backend's ``grad_logits`` writes ``dz`` over ``z``; then ``dh[rows] = dz @ W`` and
``dW += dzᵀ @ h[rows]`` (fp32). Three matmuls of ``N·V·H`` in all — the logits once, ``dh``, ``dW`` — where
``linear_token_logprobs`` needs four (its backward recomputes the logits, not knowing the loss in the forward).
Backward only scales the saved ``dh`` and ``dW`` by the loss's upstream gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels.backend import backend_for
from megatron_opd.kernels.inputs import check_linear
from megatron_opd.kernels.linear import CHUNK_LOGIT_BYTES, chunks, default_chunk
from megatron_opd.kernels.linear import linear_token_logprobs_reference as _outputs_reference
from megatron_opd.kernels.token_logprobs import TokenLogprobs, backward_coefficients
from megatron_opd.kernels.vocab_parallel import Targets, check_owned, shard_pass, vocab_shard

RowLoss = Callable[[TokenLogprobs, slice], Tensor]  # (a chunk's outputs, its rows) -> per-row losses [rows]
LOSS_CHUNK_BYTES = 4 * CHUNK_LOGIT_BYTES  # 1 GiB of logits per chunk: fewer fp32 dW accumulations (V x H each)


def _upstream(out: TokenLogprobs, rows: slice, row_loss: RowLoss) -> tuple[Tensor, list[Tensor | None]]:
    """``(Σ row losses, d/d(label log-prob, entropy, ids log-prob))`` of one chunk; ``None`` for an unused output."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in out]
    with torch.enable_grad():
        loss = row_loss(TokenLogprobs(*leaves), rows)
        used = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(loss.sum(), used, allow_unused=True))
    return loss.detach().sum(), [None if t is None else next(grads) for t in leaves]


class LinearLogprobLossFunction(torch.autograd.Function):
    """``(loss, label log-prob, entropy, ids log-prob)``; see :func:`linear_logprob_loss` (only the loss has a
    gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ids, row_loss, inv_temp, tp_group, vocab_start, chunk_tokens):
        shard = vocab_shard(weight.shape[0], tp_group, vocab_start)
        targets = Targets.of(labels, ids, shard)
        backend = backend_for(hidden)
        want_h, want_w = ctx.needs_input_grad[:2]
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        outs, owned = [], []
        for rows in chunks(hidden.shape[0], chunk_tokens):
            chunk = targets.rows(rows)
            logits = hidden[rows] @ weight.t()
            scores = shard_pass(logits, chunk, shard, inv_temp, backend, check=False)
            out = TokenLogprobs(scores.label_logprob, scores.stats.entropy, None if ids is None else scores.ids_logprob)
            loss, (g_label, g_entropy, g_ids) = _upstream(out, rows, row_loss)
            total += loss
            outs.append(out)
            owned.append(scores.stats.owned)
            if want_h or want_w:
                row_vals, g_ids = backward_coefficients(scores.stats.saved(), chunk, g_label, g_entropy, g_ids)
                d_logits = backend.grad_logits(
                    logits, chunk.labels_local, chunk.ids_local, row_vals, g_ids, inv_temp, out=logits
                )
                if want_h:
                    d_hidden[rows] = d_logits @ weight
                if want_w:
                    d_weight += d_logits.t() @ hidden[rows]  # the chunk's product rounds once; the sum is fp32
            del logits
        check_owned(torch.cat(owned), targets.expected, shard)
        if want_h:
            d_hidden = shard.all_reduce(d_hidden, dist.ReduceOp.SUM).to(hidden.dtype)
        ctx.save_for_backward(d_hidden if want_h else None, None if d_weight is None else d_weight.to(weight.dtype))
        label_lp, entropy, ids_lp = (None if o[0] is None else torch.cat(o) for o in zip(*outs))
        ctx.mark_non_differentiable(label_lp, entropy, *([] if ids_lp is None else [ids_lp]))
        return total, label_lp, entropy, ids_lp

    @staticmethod
    def backward(ctx, g_loss, *_):
        d_hidden, d_weight = ctx.saved_tensors
        scale = g_loss.to(torch.float32)
        return (
            None if d_hidden is None else d_hidden * scale.to(d_hidden.dtype),
            None if d_weight is None else d_weight * scale.to(d_weight.dtype),
            *([None] * 7),
        )


def linear_logprob_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    row_loss: RowLoss,
    ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    tp_group: ProcessGroup | None = None,
    vocab_start: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, TokenLogprobs]:
    """``(loss, outputs)``: ``loss = Σ_chunks Σ row_loss(outputs[rows], rows)`` over the outputs of
    ``linear_token_logprobs(hidden, weight, labels, ids, ...)`` (arguments as there), with its gradient w.r.t.
    ``hidden`` (summed over ``tp_group``) and ``weight`` computed during the forward in three matmuls.

    ``row_loss(out, rows)`` gets one chunk's ``TokenLogprobs`` (rows ``rows`` of the batch, fp32, differentiable) and
    returns that chunk's per-row losses ``[len(rows)]``: the loss must be a sum over rows of a function of each row's
    outputs and of constants (weights, teacher log-probs, advantages) — not of other rows' outputs. The returned
    outputs carry no gradient; backward scales the gradients computed in the forward by the loss's upstream
    gradient. ``chunk_tokens`` rows at a time (default: logits of at most 1 GiB per chunk).
    """
    inv_temp = check_linear(hidden, weight, labels, ids, temperature, chunk_tokens)
    if not callable(row_loss):
        raise TypeError(f"row_loss of type {type(row_loss).__name__}: pass a function (out, rows) -> losses [rows].")
    loss, label_lp, entropy, ids_lp = LinearLogprobLossFunction.apply(
        hidden,
        weight,
        labels.contiguous(),
        None if ids is None else ids.contiguous(),
        row_loss,
        inv_temp,
        tp_group,
        vocab_start,
        chunk_tokens or default_chunk(weight.shape[0], weight.element_size(), budget=LOSS_CHUNK_BYTES),
    )
    return loss, TokenLogprobs(label_lp, entropy, ids_lp)


def linear_logprob_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    row_loss: RowLoss,
    ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    dtype=torch.float64,
) -> tuple[Tensor, TokenLogprobs]:
    """The same through the materialized logits and autograd (tests and benchmarks only): ``row_loss`` of all rows
    of ``linear_token_logprobs_reference``, summed."""
    out = _outputs_reference(hidden, weight, labels, ids, temperature=temperature, dtype=dtype)
    return row_loss(out, slice(0, hidden.shape[0])).sum(), out
