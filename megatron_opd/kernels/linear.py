"""Token log-probs straight from hidden states and this rank's LM-head shard (issue 6 item 4): no ``[N, V_local]``
logits tensor exists beyond one chunk of tokens, in forward or backward (OBJECTIVES.md §1-§5).

Per chunk of ``chunk_tokens`` rows: ``z = h @ W_shardᵀ`` in the input dtype (as Megatron's output layer computes
it), one pass of the backend over ``z``, the TP reduction of the chunk's row statistics (one small collective per
chunk), and the chunk's logits are dropped. Backward recomputes each chunk's logits, writes their gradient with the
same one-pass ``grad_logits`` and immediately contracts it: ``dh = dz @ W``, ``dW += dzᵀ @ h`` (accumulated in fp32
across chunks). Saved for backward: ``h``, ``W`` (the caller's tensors) and three fp32 scalars per row.

``hidden`` is the full (not sequence-parallel) input of the output layer on every TP rank; its gradient is summed
over ``tp_group`` here, as Megatron's ColumnParallelLinear does for its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.config.errors import ConfigError
from megatron_opd.kernels.dispatch import backend_for
from megatron_opd.kernels.logprobs import (
    Targets,
    TokenLogprobs,
    backward_coefficients,
    check_index,
    check_temperature,
    shard_forward,
)
from megatron_opd.kernels.vocab_parallel import vocab_shard

CHUNK_LOGIT_BYTES = 1 << 28  # logits of one chunk of tokens: 256 MiB (e.g. 883 tokens x 151,936 in bf16)


def _chunks(n: int, step: int) -> list[slice]:
    return [slice(r0, min(r0 + step, n)) for r0 in range(0, n, step)]


class _LinearTokenLogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ids, inv_temp, tp_group, vocab_start, chunk):
        n = hidden.shape[0]
        probe = hidden.new_empty(0, weight.shape[0])
        shard = vocab_shard(probe, tp_group, vocab_start)
        targets = Targets.of(labels, ids, shard)
        backend = backend_for(probe)
        label_lp = hidden.new_empty(n, dtype=torch.float32)
        entropy = torch.empty_like(label_lp)
        ids_lp = hidden.new_empty(n, 0 if ids is None else ids.shape[1], dtype=torch.float32)
        saved = hidden.new_empty(n, 3, dtype=torch.float32)
        for rows in _chunks(n, chunk):
            logits = hidden[rows] @ weight.t()
            stats, label_lp[rows], ids_lp[rows] = shard_forward(logits, targets.rows(rows), shard, inv_temp, backend)
            entropy[rows], saved[rows] = stats.entropy, stats.saved()
            del logits
        ctx.save_for_backward(hidden, weight, *targets, saved)
        ctx.inv_temp, ctx.backend, ctx.chunk, ctx.shard = inv_temp, backend, chunk, shard
        return label_lp, entropy, ids_lp

    @staticmethod
    def backward(ctx, g_label, g_entropy, g_ids):
        hidden, weight, *target_tensors, saved = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[:2]
        targets = Targets(*target_tensors)
        row_vals, g_ids = backward_coefficients(saved, targets, g_label, g_entropy, g_ids)
        d_hidden = torch.empty_like(hidden) if want_h else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for rows in _chunks(hidden.shape[0], ctx.chunk):
            h, t = hidden[rows], targets.rows(rows)
            g = None if g_ids is None else g_ids[rows]
            d_logits = ctx.backend.grad_logits(
                h @ weight.t(), t.labels_local, t.ids_local, row_vals[rows], g, ctx.inv_temp
            )
            if want_h:
                d_hidden[rows] = d_logits @ weight
            if want_w:
                d_weight += d_logits.t() @ h  # the chunk's product rounds once; the sum over chunks is fp32
            del d_logits
        if want_h:
            ctx.shard.all_reduce(d_hidden, dist.ReduceOp.SUM)
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None, None, None, None, None


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
) -> TokenLogprobs:
    """:func:`token_logprobs` of ``logits = hidden @ weight.T`` without materializing the logits.

    ``hidden [N, H]`` (the same on every TP rank), ``weight [V_local, H]`` this rank's LM-head shard, same dtype;
    ``labels``/``ids``/``temperature``/``tp_group``/``vocab_start`` as in :func:`token_logprobs`. Differentiable
    w.r.t. ``hidden`` (summed over ``tp_group``) and ``weight``. ``chunk_tokens`` rows are processed at a time
    (default: logits of at most 256 MiB per chunk).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or weight.shape[0] == 0:
        raise ConfigError(
            "hidden/weight",
            f"{tuple(hidden.shape)} / {tuple(weight.shape)}",
            "must be [N, H] and [V_local, H].",
            "pass the output layer's input rows and this rank's weight shard.",
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(
            "hidden/weight", f"{hidden.dtype} / {weight.dtype}", "must share one of bf16/fp16/fp32.", "cast one."
        )
    inv_temp = check_temperature(temperature)
    n = hidden.shape[0]
    check_index("labels", labels, (n,), hidden)
    if ids is not None:
        check_index("ids", ids, (n, ids.shape[-1]), hidden)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGIT_BYTES // (weight.shape[0] * weight.element_size()))
    elif chunk_tokens < 1:
        raise ConfigError("chunk_tokens", chunk_tokens, "must be >= 1.", "omit it for the default.")
    label_lp, entropy, ids_lp = _LinearTokenLogprobsFn.apply(
        hidden,
        weight,
        labels.contiguous(),
        None if ids is None else ids.contiguous(),
        inv_temp,
        tp_group,
        vocab_start,
        chunk_tokens,
    )
    return TokenLogprobs(label_lp, entropy, None if ids is None else ids_lp)
