"""Global top-k of a vocab-sharded row (docs/objectives.md §3-§4: the teacher's top-K support, ``student_topk``), and
its float64 reference.

Each rank reads its shard once for the row statistics and its local top-k (``vocab_parallel.shard_pass``), the TP
ranks exchange ``TP x k`` candidates, and every rank selects the same global top-k from the same gathered tensor.
Forward only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels.backend import backend_for
from megatron_opd.kernels.inputs import check_k, check_logits, check_temperature
from megatron_opd.kernels.vocab_parallel import Targets, shard_pass, vocab_shard


@torch.no_grad()
def topk_logprobs(
    logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    tp_group: ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(ids [N, k] int64 global ids, logprobs [N, k] fp32)``: the k most likely tokens of
    ``softmax(logits / temperature)`` over the full vocabulary, sorted by descending log-prob, identical on every
    rank of ``tp_group``. ``logits`` is this rank's shard ``[N, V_local]`` (see ``token_logprobs``)."""
    check_logits(logits)
    inv_temp = check_temperature(temperature)
    shard = vocab_shard(logits.shape[1], tp_group, vocab_start)
    check_k(k, shard.vocab_size(vocab_start is not None, logits.device))
    no_labels = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=logits.device)
    scores = shard_pass(logits, Targets.of(no_labels, None, shard), shard, inv_temp, backend_for(logits), topk=k)
    return scores.topk_ids, scores.topk_logprob


def topk_logprobs_reference(
    logits: Tensor, k: int, *, temperature: float = 1.0, dtype=torch.float64
) -> tuple[Tensor, Tensor]:
    """``(ids, logprobs)`` of the k largest entries of the full-vocab ``log_softmax`` in ``dtype``, descending
    (tests and benchmarks only: it builds ``[N, V]`` tensors)."""
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    values, ids = torch.topk(logp, k, dim=-1)
    return ids, values
