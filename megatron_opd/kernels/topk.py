"""Global top-k of a vocab-sharded row (OBJECTIVES.md §3-§4: the teacher's top-K support, ``student_topk``).

Each rank reads its shard once for the row statistics and its local top-k (the Triton backend fuses both into one
pass plus a small candidate pass), the TP ranks exchange ``TP x k`` candidates, and every rank selects the same
global top-k from the same gathered tensor. Forward only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.config.errors import ConfigError
from megatron_opd.kernels.dispatch import backend_for
from megatron_opd.kernels.logprobs import check_logits, check_temperature
from megatron_opd.kernels.vocab_parallel import reduce_row_stats, vocab_shard


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
    rank of ``tp_group``. ``logits`` is this rank's shard ``[N, V_local]`` (see :func:`token_logprobs`)."""
    check_logits(logits)
    inv_temp = check_temperature(temperature)
    shard = vocab_shard(logits, tp_group, vocab_start)
    v_global = shard.size * shard.world
    if vocab_start is not None and shard.world > 1:
        v_global = int(shard.all_reduce(torch.tensor([shard.size], device=logits.device), dist.ReduceOp.SUM).item())
    if not (isinstance(k, int) and 1 <= k <= v_global):
        raise ConfigError("k", k, f"must be an int in [1, {v_global}] (the vocabulary size).", "lower k.")
    n = logits.shape[0]
    no_labels = torch.full((n,), -1, dtype=torch.int64, device=logits.device)
    local, top_x, top_col = backend_for(logits).row_stats(logits, no_labels, None, inv_temp, k)
    zero = torch.zeros(n, dtype=torch.int64, device=logits.device)
    stats = reduce_row_stats(local, shard, zero, zero)
    top_ids = top_col + shard.start
    if top_x.shape[1] < k:  # this shard is narrower than k: pad with entries that never win
        pad = k - top_x.shape[1]
        top_x = torch.cat([top_x, top_x.new_full((n, pad), -torch.inf)], dim=1)
        top_ids = torch.cat([top_ids, top_ids.new_full((n, pad), -1)], dim=1)
    cand_x = shard.all_gather(top_x).permute(1, 0, 2).reshape(n, shard.world * k)
    cand_ids = shard.all_gather(top_ids).permute(1, 0, 2).reshape(n, shard.world * k)
    # Real candidates first, then a stable descending sort: padding loses even against -inf logits, and every rank
    # makes the same choice from the same gathered tensor.
    order = torch.argsort(cand_ids < 0, dim=1, stable=True)
    cand_x, cand_ids = cand_x.gather(1, order), cand_ids.gather(1, order)
    best_x, pos = torch.sort(cand_x, dim=1, descending=True, stable=True)
    return cand_ids.gather(1, pos[:, :k]), stats.logprob(best_x[:, :k])
