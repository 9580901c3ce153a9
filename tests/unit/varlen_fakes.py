"""Stand-ins for ``torch.nn.attention.varlen.varlen_attn`` with the exact signature of each torch
release (copied from its ``torch/nn/attention/varlen.py``), computing what the flash kernel computes,
in float64, on any device. torch 2.8 and 2.9 have no ``varlen_attn``.

- 2.10: ``is_causal`` (positional or keyword), no ``scale`` (the kernel uses ``1/sqrt(D)``), and K/V
  documented with the query's heads.
- 2.11: keyword-only ``scale`` and ``window_size`` (``(-1, 0)`` = causal), still no ``enable_gqa``.
- 2.12 – 2.15: ``enable_gqa`` added (and ``seqused_k``, ``block_table``, ``num_splits``); K/V heads must
  equal the query's unless ``enable_gqa``, which the real function checks before the kernel.

Each fake counts its calls in ``CALLS`` (name -> count) so tests can tell it ran.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

import torch

CALLS: Counter[str] = Counter()


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    scale: float | None,
    window: tuple[int, int],
    gqa: bool,
) -> torch.Tensor:
    """Softmax attention per sequence with flash's window rule: query ``i`` sees key ``j`` when
    ``i - left <= j <= i + right`` (a negative bound is unlimited)."""
    heads_q, heads_k, dim = query.shape[1], key.shape[1], query.shape[2]
    if heads_q != heads_k and not gqa:
        raise ValueError(
            f"Expect query and key/value to have the same number of heads but got Hq={heads_q} and Hkv={heads_k}."
        )
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    bounds = zip(itertools.pairwise(cu_seq_q.tolist()), itertools.pairwise(cu_seq_k.tolist()))
    for (q0, q1), (k0, k1) in bounds:
        q = query[q0:q1].double()  # [s, Hq, D]
        k = key[k0:k1].double().repeat_interleave(heads_q // heads_k, dim=1)
        v = value[k0:k1].double().repeat_interleave(heads_q // heads_k, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale
        i = torch.arange(q1 - q0).unsqueeze(1)
        j = torch.arange(k1 - k0).unsqueeze(0)
        left, right = window
        allowed = torch.ones_like(i - j, dtype=torch.bool)
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
        out[q0:q1] = torch.einsum("hij,jhd->ihd", probs, v)
    return out.to(query.dtype)


def varlen_attn_2_10(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool = False,
    return_aux: Any = None,
) -> torch.Tensor:
    CALLS["2.10"] += 1
    return _attention(query, key, value, cu_seq_q, cu_seq_k, None, (-1, 0) if is_causal else (-1, -1), False)


def varlen_attn_2_11(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    return_aux: Any = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    CALLS["2.11"] += 1
    return _attention(query, key, value, cu_seq_q, cu_seq_k, scale, window_size, False)


def varlen_attn_2_12(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: Any = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """2.12, 2.13, 2.14 and 2.15 share this signature."""
    CALLS["2.12"] += 1
    assert cu_seq_k is not None
    return _attention(query, key, value, cu_seq_q, cu_seq_k, scale, window_size, enable_gqa)


# torch release -> the fake with its signature
BY_RELEASE = {"2.10": varlen_attn_2_10, "2.11": varlen_attn_2_11, "2.12-2.15": varlen_attn_2_12}
