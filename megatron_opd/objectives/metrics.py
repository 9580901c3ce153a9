"""Objective metrics as (sum, count) pairs, so the trainer can add them over micro-batches and
all-reduce them over data-parallel ranks before dividing (the list: docs/objectives.md, Metrics)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

# name -> (Σ value, Σ count), both 0-dim float64 tensors without gradient.
Metrics = dict[str, tuple[Tensor, Tensor]]


def masked_metric(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ values over ``mask``, Σ mask) of per-token ``values`` [N]; masked-out entries may be non-finite."""
    keep = mask > 0
    values = values.detach().to(torch.float64)
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total, keep.sum().to(torch.float64)


def merge_metrics(parts: Iterable[Metrics]) -> Metrics:
    """Add the (sum, count) pairs of several micro-batches key by key."""
    out: Metrics = {}
    for part in parts:
        for name, (total, count) in part.items():
            if name in out:
                out[name] = (out[name][0] + total, out[name][1] + count)
            else:
                out[name] = (total, count)
    return out


def reduce_metrics(metrics: Metrics, group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Means ``Σ sum / Σ count``, all-reduced over ``group`` (None: this process only).

    Every rank must pass the same keys (objectives report a fixed key set per configuration).
    Metrics with a zero total count are left out.
    """
    if not metrics:
        return {}
    names = sorted(metrics)
    packed = torch.stack([torch.stack([metrics[n][0], metrics[n][1]]) for n in names])
    if group is not None:
        dist.all_reduce(packed, group=group)
    return {n: float(s / c) for n, (s, c) in zip(names, packed.tolist()) if c > 0}
