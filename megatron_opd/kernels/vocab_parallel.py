"""Vocab-parallel plumbing shared by the ops (docs/objectives.md §5; docs/kernels.md: never an fp32
``[tokens × vocab]`` tensor): which global ids this tensor-parallel rank owns, the one pass over a shard plus the
reduction of its row statistics over the TP group into full-vocab log-sum-exp and entropy, and the exchange of
top-k candidates.

A rank's shard is summarized per row by ``LocalStats`` relative to the shard's own max ``m_r`` (of ``x = z / T``):
``s_r = Σ exp(x - m_r)`` and ``a_r = Σ exp(x - m_r)·(x - m_r)``. With the global max ``M`` (one all-reduce MAX of
``[N]``, on the logits ``z``) they rescale exactly: ``S = Σ_r s_r e^{m_r - M}``, ``A = Σ_r e^{m_r - M}(a_r + (m_r - M) s_r)``;
then ``log p = (x - M) - log S`` and ``H = log S - A / S`` (no cancellation between two large numbers). The logits the
rank owns at the labels and ids ride along in one all-reduce SUM.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_opd.kernels.backend import LocalStats, VocabBackend


class RowStats(NamedTuple):
    """Full-vocab per-row results, identical on every TP rank; all fp32. The log-sum-exp is kept as
    ``row_max + log_sum`` so that ``log p = (x - row_max) - log_sum`` stays exact for large logits."""

    row_max: Tensor  # [N] global max of x
    z_max: Tensor  # [N] global max of the logits z (row_max = z_max / T)
    log_sum: Tensor  # [N] log Σ_j exp(x_j - row_max) over the full vocab
    entropy: Tensor  # [N]
    label_x: Tensor  # [N] x at the label (0 where no rank owns it)
    ids_x: Tensor | None  # [N, K]
    owned: Tensor  # [N] fp32 count of the labels/ids some rank owns

    def saved(self) -> Tensor:
        """``[N, 3]`` (max of z, log-sum, entropy): all that backward needs of the forward."""
        return torch.stack([self.z_max, self.log_sum, self.entropy], dim=1)

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

    def vocab_size(self, uneven: bool, device: torch.device) -> int:
        """The global vocabulary: ``world x size`` for Megatron's even split, else (``uneven``) summed over the
        group (one small all-reduce)."""
        if not uneven or self.world == 1:
            return self.world * self.size
        return int(self.all_reduce(torch.tensor([self.size], device=device), dist.ReduceOp.SUM).item())


def vocab_shard(v_local: int, tp_group: ProcessGroup | None, vocab_start: int | None) -> VocabShard:
    """Megatron's even split (rank r owns ``[r·V_local, (r+1)·V_local)``) unless ``vocab_start`` says otherwise."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if vocab_start is None:
        vocab_start = (0 if tp_group is None else dist.get_rank(tp_group)) * v_local
    elif vocab_start < 0:
        raise ValueError(f"vocab_start={vocab_start}: must be >= 0; pass this rank's first global vocab id.")
    return VocabShard(tp_group, world, int(vocab_start), v_local)


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


def reduce_row_stats(
    local: LocalStats, shard: VocabShard, inv_temp: float, owned: Tensor, expected: Tensor | None
) -> RowStats:
    """Combine every rank's ``LocalStats`` into full-vocab ``RowStats`` (one MAX and one SUM all-reduce).

    ``owned[N]`` counts the labels/ids this rank owns per row and ``expected[N]`` the non-negative ones; after the
    SUM they must match, else some id lies outside the global vocabulary (``check_owned``; skipped when
    ``expected`` is ``None``: callers reducing many chunks check ``RowStats.owned`` once).
    """
    m_local = local.z_max
    m = shard.all_reduce(m_local.clone(), dist.ReduceOp.MAX)
    present = local.sum_exp > 0
    shift = torch.where(present, (m_local - m) * inv_temp, torch.zeros_like(m))
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
    if expected is not None:
        check_owned(owned_total, expected, shard)
    log_total = torch.log(total)
    return RowStats(
        row_max=m * inv_temp,
        z_max=m,
        log_sum=log_total,
        entropy=log_total - shifted / total,
        label_x=label_x,
        ids_x=packed[:, 4:] if k else None,
        owned=owned_total,
    )


def check_owned(owned_total: Tensor, expected: Tensor, shard: VocabShard) -> None:
    """Every non-negative label/id is owned by exactly one rank (one device sync)."""
    if not torch.equal(owned_total, expected.to(owned_total.dtype)):
        raise ValueError(
            f"labels/ids: some ids are >= the global vocabulary size (no tensor-parallel rank owns them; this rank's "
            f"shard is [{shard.start}, {shard.start + shard.size}) of {shard.world} ranks); pass global token ids in "
            "[0, V) and a negative ignore index (e.g. -100) for masked positions."
        )


class ShardScores(NamedTuple):
    """What one pass over a shard gives, reduced over the TP group; identical on every rank."""

    stats: RowStats
    label_logprob: Tensor  # [N]; 0 where the label is negative
    ids_logprob: Tensor  # [N, K] ([N, 0] without ids); 0 where an id is negative
    topk_ids: Tensor | None  # [N, k] global ids, descending log-prob
    topk_logprob: Tensor | None  # [N, k]


def shard_pass(
    logits: Tensor,
    targets: Targets,
    shard: VocabShard,
    inv_temp: float,
    backend: VocabBackend,
    topk: int = 0,
    check: bool = True,
) -> ShardScores:
    """One read of the shard by ``backend`` and the TP reduction: full-vocab log-probs at the labels and ids and,
    with ``topk > 0``, the global top-``topk``; ``check=False`` leaves the vocabulary-range check to the caller."""
    local, top_x, top_col = backend.row_stats(logits, targets.labels_local, targets.ids_local, inv_temp, topk)
    stats = reduce_row_stats(local, shard, inv_temp, targets.owned, targets.expected if check else None)
    label_lp = torch.where(targets.labels >= 0, stats.logprob(stats.label_x), torch.zeros_like(stats.label_x))
    if targets.ids is None:
        ids_lp = stats.label_x.new_zeros(targets.labels.shape[0], 0)
    else:
        ids_lp = torch.where(targets.ids >= 0, stats.logprob(stats.ids_x), torch.zeros_like(stats.ids_x))
    if not topk:
        return ShardScores(stats, label_lp, ids_lp, None, None)
    top_ids, top_xs = gather_topk(top_x, top_col, shard, topk)
    return ShardScores(stats, label_lp, ids_lp, top_ids, stats.logprob(top_xs))


def gather_topk(top_x: Tensor, top_col: Tensor, shard: VocabShard, k: int) -> tuple[Tensor, Tensor]:
    """The global top-``k`` ``(ids, x)`` from every rank's local top-``k`` (``x`` and shard columns, ``-1`` padding):
    one all-gather of ``TP x k`` candidates each, the same stable sort on every rank (ties keep rank order)."""
    top_ids = torch.where(top_col >= 0, top_col + shard.start, top_col)
    if shard.world == 1:
        return top_ids, top_x  # the backend's order already
    n = top_x.shape[0]
    cand_x = shard.all_gather(top_x).permute(1, 0, 2).reshape(n, shard.world * k)
    cand_ids = shard.all_gather(top_ids).permute(1, 0, 2).reshape(n, shard.world * k)
    # Real candidates first, then a stable descending sort: padding loses even against -inf logits.
    order = torch.argsort(cand_ids < 0, dim=1, stable=True)
    cand_x, cand_ids = cand_x.gather(1, order), cand_ids.gather(1, order)
    best_x, pos = torch.sort(cand_x, dim=1, descending=True, stable=True)
    return cand_ids.gather(1, pos[:, :k]), best_x[:, :k]


def cat_scores(parts: list[ShardScores]) -> ShardScores:
    """The row-wise concatenation of the scores of consecutive row chunks."""

    def cat(ts: list[Tensor | None]) -> Tensor | None:
        return None if ts[0] is None else torch.cat(ts)

    stats = RowStats(*(cat([p.stats[i] for p in parts]) for i in range(len(RowStats._fields))))
    return ShardScores(stats, *(cat([p[i] for p in parts]) for i in range(1, len(ShardScores._fields))))
