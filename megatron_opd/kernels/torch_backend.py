"""The chunked torch implementation of ``backend.VocabBackend`` (CPU, and any device without Triton): the same two
passes as the Triton kernels, over blocks of rows so that no fp32 copy larger than ``CHUNK_ELEMENTS`` of the logits
shard ever exists (docs/kernels.md: never an fp32 ``[tokens × vocab]`` tensor; docs/objectives.md §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_opd.kernels.backend import LocalStats

CHUNK_ELEMENTS = 1 << 20  # fp32 elements per temporary (4 MiB)


def _row_slices(n: int, v: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    return [slice(r0, min(r0 + step, n)) for r0 in range(0, n, step)]


def _scaled(chunk: Tensor, inv_temp: float) -> Tensor:
    """A new fp32 tensor ``chunk / T`` (never aliasing ``chunk``: it is modified in place by the callers)."""
    return chunk.float() * inv_temp if inv_temp != 1.0 else chunk.to(torch.float32, copy=True)


def _gather_x(x: Tensor, cols: Tensor) -> Tensor:
    """``x`` at columns ``cols`` (any shape [R, K]); 0 where ``cols < 0``."""
    vals = x.gather(1, cols.clamp(min=0))
    return torch.where(cols >= 0, vals, torch.zeros_like(vals))


def row_stats(
    logits: Tensor, labels_local: Tensor, ids_local: Tensor | None, inv_temp: float, topk: int
) -> tuple[LocalStats, Tensor | None, Tensor | None]:
    """See ``backend.VocabBackend.row_stats``."""
    n, v = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    z_max, sum_exp, sum_shift, label_x = (torch.empty(n, **f32) for _ in range(4))
    ids_x = None if ids_local is None else torch.empty(ids_local.shape, **f32)
    kk = min(topk, v)
    top_x = torch.full((n, topk), -torch.inf, **f32) if topk else None
    top_col = torch.full((n, topk), -1, dtype=torch.int64, device=logits.device) if topk else None
    for rows in _row_slices(n, v):
        x = _scaled(logits[rows], inv_temp)  # the only fp32 chunk copy; reused in place below
        label_x[rows] = _gather_x(x, labels_local[rows].unsqueeze(1)).squeeze(1)
        if ids_x is not None:
            ids_x[rows] = _gather_x(x, ids_local[rows])
        if topk:
            top_x[rows, :kk], top_col[rows, :kk] = torch.topk(x, kk, dim=1)
        m = x.amax(dim=1)  # = z_max · inv_temp rounded: x is z · inv_temp rounded, and rounding is monotonic
        z_max[rows] = logits[rows].amax(dim=1).float()
        d = x.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m)).unsqueeze(1))
        e = torch.exp(d)
        sum_exp[rows] = e.sum(dim=1)
        sum_shift[rows] = d.masked_fill_(e == 0, 0.0).mul_(e).sum(dim=1)
        del x, d, e  # before the next chunk allocates its own
    return LocalStats(z_max, sum_exp, sum_shift, label_x, ids_x), top_x, top_col


def grad_logits(
    logits: Tensor,
    labels_local: Tensor,
    ids_local: Tensor | None,
    row_vals: Tensor,
    g_ids: Tensor | None,
    inv_temp: float,
    out: Tensor | None = None,
) -> Tensor:
    """See ``backend.VocabBackend.grad_logits``; each row block is read into an fp32 copy before its gradient is
    written, so ``out`` may be ``logits``."""
    n, v = logits.shape
    out = torch.empty_like(logits) if out is None else out
    z_max, log_sum, ent, g_all, g_ent, g_lab = row_vals.unbind(1)
    for rows in _row_slices(n, v):
        m = (z_max[rows] * inv_temp).unsqueeze(1)
        logp = _scaled(logits[rows], inv_temp).sub_(m).sub_(log_sum[rows].unsqueeze(1))
        p = torch.exp(logp)
        dx = logp.add_(ent[rows].unsqueeze(1)).mul_(-g_ent[rows].unsqueeze(1)).sub_(g_all[rows].unsqueeze(1))
        dx.masked_fill_(p == 0, 0.0).mul_(p)
        lab = labels_local[rows].unsqueeze(1)
        dx.scatter_add_(1, lab.clamp(min=0), torch.where(lab >= 0, g_lab[rows].unsqueeze(1), 0.0))
        if ids_local is not None:
            cols = ids_local[rows]
            dx.scatter_add_(1, cols.clamp(min=0), torch.where(cols >= 0, g_ids[rows], 0.0))
        if inv_temp != 1.0:
            dx.mul_(inv_temp)
        out[rows] = dx
        del logp, p, dx  # before the next chunk allocates its own
    return out
