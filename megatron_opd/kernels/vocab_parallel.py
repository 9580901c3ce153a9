"""Vocab-parallel plumbing (OBJECTIVES.md §5, DESIGN "no fp32 [tokens x vocab] tensor"): which global ids this
tensor-parallel rank owns, the per-row statistics each rank computes over its shard, and their reduction over the
TP group into full-vocab log-sum-exp and entropy.

A rank's shard is summarized per row by four fp32 scalars (``LocalStats``), relative to the shard's own max
``m_r``: ``s_r = Σ exp(x - m_r)`` and ``a_r = Σ exp(x - m_r)·(x - m_r)`` with ``x = z / T``. With the global max
``M`` (one all-reduce MAX of ``[N]``) they rescale exactly: ``S = Σ_r s_r e^{m_r - M}``,
``A = Σ_r e^{m_r - M}(a_r + (m_r - M) s_r)``; then ``log p = (x - M) - log S`` and ``H = log S - A / S`` (no cancellation
between two large numbers). The logits the rank owns at the labels and ids ride along in one all-reduce SUM.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.config.errors import ConfigError


class LocalStats(NamedTuple):
    """One rank's per-row summary of its vocab shard, ``x = logits / temperature``; all fp32."""

    row_max: Tensor  # [N] max_j x_j over the shard (-inf when the whole shard row is -inf)
    sum_exp: Tensor  # [N] Σ exp(x - row_max)
    sum_exp_shift: Tensor  # [N] Σ exp(x - row_max)·(x - row_max)
    label_x: Tensor  # [N] x at the label when this rank owns it, else 0
    ids_x: Tensor | None  # [N, K] x at ids this rank owns, else 0


class RowStats(NamedTuple):
    """Full-vocab per-row results, identical on every TP rank; all fp32. The log-sum-exp is kept as
    ``row_max + log_sum`` so that ``log p = (x - row_max) - log_sum`` stays exact for large logits."""

    row_max: Tensor  # [N] global max of x
    log_sum: Tensor  # [N] log Σ_j exp(x_j - row_max) over the full vocab
    entropy: Tensor  # [N]
    label_x: Tensor  # [N] x at the label (0 where no rank owns it)
    ids_x: Tensor | None  # [N, K]

    def saved(self) -> Tensor:
        """``[N, 3]`` (max, log-sum, entropy): all that backward needs of the forward."""
        return torch.stack([self.row_max, self.log_sum, self.entropy], dim=1)

    def logprob(self, x: Tensor) -> Tensor:
        """``log p`` for values ``x`` of shape [N] or [N, K]."""
        if x.dim() == 2:
            return (x - self.row_max.unsqueeze(1)) - self.log_sum.unsqueeze(1)
        return (x - self.row_max) - self.log_sum


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous slice ``[start, start + size)`` of the global vocabulary."""

    group: ProcessGroup | None
    world: int
    start: int
    size: int

    def localize(self, ids: Tensor) -> Tensor:
        """Global ids -> column in this shard, -1 where this rank does not own the id (or the id is negative)."""
        local = ids - self.start
        return torch.where((ids >= 0) & (local >= 0) & (local < self.size), local, torch.full_like(local, -1))

    def all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """``[world, *t.shape]``, rank order."""
        if self.world == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)


def vocab_shard(logits: Tensor, tp_group: ProcessGroup | None, vocab_start: int | None) -> VocabShard:
    """Megatron's even split (rank r owns ``[r·V_local, (r+1)·V_local)``) unless ``vocab_start`` says otherwise."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    size = logits.shape[-1]
    if vocab_start is None:
        vocab_start = (0 if tp_group is None else dist.get_rank(tp_group)) * size
    elif vocab_start < 0:
        raise ConfigError("vocab_start", vocab_start, "must be >= 0.", "pass this rank's first global vocab id.")
    return VocabShard(tp_group, world, int(vocab_start), size)


def reduce_row_stats(local: LocalStats, shard: VocabShard, owned: Tensor, expected: Tensor) -> RowStats:
    """Combine every rank's ``LocalStats`` into full-vocab ``RowStats`` (one MAX and one SUM all-reduce).

    ``owned[N]`` counts the labels/ids this rank owns per row and ``expected[N]`` the non-negative ones; after the
    SUM they must match, else some id lies outside the global vocabulary (raised as an error naming the inputs).
    """
    m_local = local.row_max
    m = shard.all_reduce(m_local.clone(), dist.ReduceOp.MAX)
    present = local.sum_exp > 0
    shift = torch.where(present, m_local - m, torch.zeros_like(m))
    scale = torch.where(present, torch.exp(shift), torch.zeros_like(m))
    cols = [
        local.sum_exp * scale,
        scale * (local.sum_exp_shift + shift * local.sum_exp),
        local.label_x,
        owned.to(torch.float32),
    ]
    k = 0 if local.ids_x is None else local.ids_x.shape[1]
    packed = torch.stack(cols, dim=1)
    if k:
        packed = torch.cat([packed, local.ids_x], dim=1)
    packed = shard.all_reduce(packed, dist.ReduceOp.SUM)
    total, shifted, label_x, owned_total = packed[:, 0], packed[:, 1], packed[:, 2], packed[:, 3]
    if not torch.equal(owned_total, expected.to(torch.float32)):
        raise ConfigError(
            "labels/ids",
            None,
            f"some ids are >= the global vocabulary size (no tensor-parallel rank owns them; shard of this rank: "
            f"[{shard.start}, {shard.start + shard.size}) of {shard.world} ranks).",
            "pass global token ids in [0, V) and a negative ignore index (e.g. -100) for masked positions.",
        )
    log_total = torch.log(total)
    return RowStats(
        row_max=m,
        log_sum=log_total,
        entropy=log_total - shifted / total,
        label_x=label_x,
        ids_x=packed[:, 4:] if k else None,
    )
