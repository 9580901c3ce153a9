"""Scoring straight from hidden states and this rank's LM-head shard (docs/objectives.md §3-§4: a teacher's
sampled-token log-prob and its top-K support in one pass), forward only; and its float64 reference.

Per chunk of ``chunk_tokens`` rows: ``z = h @ W_shardᵀ`` in the input dtype, one pass of the backend over ``z`` giving
the row statistics, ``x`` at the labels and ids and the shard's top-k, then the TP reduction and the exchange of
``TP x k`` candidates; the chunk's logits are dropped. No ``[N, V_local]`` tensor exists beyond one chunk, and none in
fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels.backend import backend_for
from megatron_opd.kernels.inputs import check_k, check_linear
from megatron_opd.kernels.linear import default_chunk, score_chunks
from megatron_opd.kernels.token_logprobs import token_logprobs_reference
from megatron_opd.kernels.topk import topk_logprobs_reference
from megatron_opd.kernels.vocab_parallel import Targets, vocab_shard


class TopkLogprobs(NamedTuple):
    """Per-row results of :func:`linear_topk_logprobs`; all fp32 but the ids, identical on every TP rank."""

    ids: Tensor  # [N, k] int64 global ids of the k most likely tokens, by descending log-prob
    logprobs: Tensor  # [N, k]
    label_logprob: Tensor  # [N] log p(label); 0 where the label is negative
    entropy: Tensor  # [N]
    ids_logprob: Tensor | None  # [N, K] log p at given ids; 0 where an id is negative


@torch.no_grad()
def linear_topk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    k: int,
    ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    tp_group: ProcessGroup | None = None,
    vocab_start: int | None = None,
    chunk_tokens: int | None = None,
) -> TopkLogprobs:
    """The global top-``k`` ids and log-probs, the label log-prob, the entropy and the log-probs at ``ids`` of
    ``softmax(hidden @ weight.T / temperature)``, in one pass per chunk of rows and without materializing the logits.

    Arguments as in ``linear_token_logprobs``; ``k`` in ``[1, V]``. ``chunk_tokens`` rows at a time (default: logits
    of at most 256 MiB per chunk).
    """
    inv_temp = check_linear(hidden, weight, labels, ids, temperature, chunk_tokens)
    shard = vocab_shard(weight.shape[0], tp_group, vocab_start)
    check_k(k, shard.vocab_size(vocab_start is not None, hidden.device))
    targets = Targets.of(labels.contiguous(), None if ids is None else ids.contiguous(), shard)
    chunk = chunk_tokens or default_chunk(weight.shape[0], weight.element_size())
    scores = score_chunks(hidden, weight, targets, shard, inv_temp, backend_for(hidden), chunk, topk=k)
    return TopkLogprobs(
        scores.topk_ids,
        scores.topk_logprob,
        scores.label_logprob,
        scores.stats.entropy,
        None if ids is None else scores.ids_logprob,
    )


def linear_topk_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    k: int,
    ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    dtype=torch.float64,
) -> TopkLogprobs:
    """The same from the materialized logits ``hidden @ weight.T`` (in the inputs' dtype, as the output layer
    computes them), with ``dtype`` math over the full vocabulary (tests and benchmarks only)."""
    logits = hidden @ weight.t()
    top_ids, top_lp = topk_logprobs_reference(logits, k, temperature=temperature, dtype=dtype)
    out = token_logprobs_reference(logits, labels, ids, temperature=temperature, dtype=dtype)
    return TopkLogprobs(top_ids, top_lp, out.label_logprob, out.entropy, out.ids_logprob)
