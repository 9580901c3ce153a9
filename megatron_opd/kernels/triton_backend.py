"""Triton kernels for the vocab-sized passes (issue 6; OBJECTIVES.md §1-§5), same interface as ``torch_backend``.

- ``_row_stats_kernel``: one program per row streams the shard in ``BLOCK_V`` tiles (online softmax: running max,
  Σ exp, Σ exp·shift), loads the label and id logits, and optionally writes the max of every ``GROUP`` consecutive
  logits (for top-k). Reads the logits once; writes O(1) per row (+ ``V/GROUP`` group maxima for top-k).
- ``_topk_candidates_kernel``: exact local top-k from the group maxima: the k best groups (a torch top-k over
  ``[N, V/GROUP]``) hold every element of the top-k (any element outside them is beaten by k group maxima), so one
  program per row loads those ``k·GROUP`` logits (contiguous 2·GROUP-byte runs) and takes a bitonic top-k of
  (value, column) packed into order-preserving int64 keys.
- ``_grad_kernel``: one program per row recomputes ``p`` from the saved row scalars and writes dlogits in the logits'
  dtype in one pass; the K support ids are then rewritten with their full one-hot coefficients (duplicates summed
  in registers, so every writer of a position writes the same value).

Block sizes target Hopper (``/work/.library/device/HOPPER.md``): 4096-wide tiles of bf16 are 8 KiB per row step,
16 elements (two 16-byte loads) per thread at 8 warps; overridable with ``OPD_TRITON_BLOCK_V`` /
``OPD_TRITON_NUM_WARPS`` for tuning and for the interpreter tests (small tiles, many of them).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_opd.kernels import torch_backend
from megatron_opd.kernels.vocab_parallel import LocalStats

BLOCK_V = 4096
NUM_WARPS = 8
MAX_CANDIDATES = 16384  # k_pow2 · GROUP elements held by one top-k program
_KEY_FLOOR = tl.constexpr(-9223372036854775807)  # below every real (value, column) key


def _block_v(v: int) -> int:
    return min(int(os.environ.get("OPD_TRITON_BLOCK_V", BLOCK_V)), triton.next_power_of_2(v))


def _num_warps() -> int:
    return int(os.environ.get("OPD_TRITON_NUM_WARPS", NUM_WARPS))


def _group_size(v: int, k: int, block: int) -> int:
    """Group width for top-k: about sqrt(2V/k), balancing the group-max writes (4/GROUP bytes per logit) against
    the candidate reads (k·GROUP logits per row); 0 when the shard is too narrow for groups to pay off."""
    g = 1 << max(0, round(math.log2(max(1.0, math.sqrt(2.0 * v / k)))))
    g = min(g, 128, block)
    while g > 1 and max(2, triton.next_power_of_2(k)) * g > MAX_CANDIDATES:
        g //= 2
    return g if g >= 2 and triton.cdiv(v, g) >= k else 0


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    stride_z,
    labels_ptr,
    ids_ptr,
    stride_ids,
    stats_ptr,
    ids_x_ptr,
    gmax_ptr,
    stride_g,
    V,
    K,
    n_groups,
    inv_temp,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_IDS: tl.constexpr,
    WRITE_GROUP_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_z
    m = -float("inf")
    s = 0.0
    a = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = x - m_safe
        e = tl.exp(d)
        shift = tl.where(s > 0, m - m_safe, 0.0)
        alpha = tl.where(s > 0, tl.exp(shift), 0.0)
        a = alpha * (a + shift * s) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
        if WRITE_GROUP_MAX:
            gm = tl.max(tl.reshape(x, (BLOCK_V // GROUP, GROUP)), axis=1)
            gidx = start // GROUP + tl.arange(0, BLOCK_V // GROUP)
            tl.store(gmax_ptr + row * stride_g + gidx, gm, mask=gidx < n_groups)
    lab = tl.load(labels_ptr + row)
    lab_x = tl.load(base + tl.maximum(lab, 0)).to(tl.float32) * inv_temp
    out = stats_ptr + row * 4
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, a)
    tl.store(out + 3, tl.where(lab >= 0, lab_x, 0.0))
    if HAS_IDS:
        ks = tl.arange(0, BLOCK_K)
        idl = tl.load(ids_ptr + row * stride_ids + ks, mask=ks < K, other=-1)
        ix = tl.load(base + tl.maximum(idl, 0), mask=idl >= 0, other=0.0).to(tl.float32) * inv_temp
        tl.store(ids_x_ptr + row * K + ks, tl.where(idl >= 0, ix, 0.0), mask=ks < K)


@triton.jit
def _topk_candidates_kernel(
    logits_ptr,
    stride_z,
    groups_ptr,
    out_x_ptr,
    out_col_ptr,
    V,
    k,
    inv_temp,
    K_POW: tl.constexpr,
    GROUP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, K_POW)
    grp = tl.load(groups_ptr + row * k + kk, mask=kk < k, other=0)
    cols = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    valid = (kk[:, None] < k) & (cols < V)
    x = tl.load(logits_ptr + row * stride_z + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temp
    # (value, column) -> int64 key whose order is (value ascending, column descending): ties go to the lower id.
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (V - 1 - cols).to(tl.int64)
    key = tl.where(valid, key, _KEY_FLOOR)
    top = tl.topk(tl.reshape(key, (K_POW * GROUP,)), K_POW)
    col = V - 1 - (top & 0xFFFFFFFF)
    hi = (top >> 32).to(tl.int32)
    val = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    kk2 = tl.arange(0, K_POW)
    tl.store(out_x_ptr + row * k + kk2, val, mask=kk2 < k)
    tl.store(out_col_ptr + row * k + kk2, col, mask=kk2 < k)


@triton.jit
def _grad_kernel(
    logits_ptr,
    stride_z,
    grad_ptr,
    stride_gz,
    labels_ptr,
    ids_ptr,
    stride_ids,
    row_vals_ptr,
    g_ids_ptr,
    V,
    K,
    inv_temp,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_IDS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_z
    gbase = grad_ptr + row * stride_gz
    rv = row_vals_ptr + row * 6
    m = tl.load(rv)
    log_sum = tl.load(rv + 1)
    ent = tl.load(rv + 2)
    g_all = tl.load(rv + 3)
    g_ent = tl.load(rv + 4)
    g_lab = tl.load(rv + 5)
    lab = tl.load(labels_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temp
        logp = (x - m) - log_sum
        p = tl.exp(logp)
        dx = tl.where(p > 0, p * (-g_all - g_ent * (logp + ent)), 0.0) + tl.where(cols == lab, g_lab, 0.0)
        tl.store(gbase + cols, (dx * inv_temp).to(grad_ptr.dtype.element_ty), mask=cols < V)
    if HAS_IDS:
        tl.debug_barrier()  # the dense values above are written before the support positions are rewritten
        ks = tl.arange(0, BLOCK_K)
        idl = tl.load(ids_ptr + row * stride_ids + ks, mask=ks < K, other=-1)
        gk = tl.load(g_ids_ptr + row * K + ks, mask=ks < K, other=0.0)
        coef = tl.sum(tl.where(idl[:, None] == idl[None, :], gk[None, :], 0.0), axis=1)
        coef += tl.where(idl == lab, g_lab, 0.0)
        x = tl.load(base + tl.maximum(idl, 0), mask=idl >= 0, other=-float("inf")).to(tl.float32) * inv_temp
        logp = (x - m) - log_sum
        p = tl.exp(logp)
        dx = tl.where(p > 0, p * (-g_all - g_ent * (logp + ent)), 0.0) + coef
        tl.store(gbase + tl.maximum(idl, 0), (dx * inv_temp).to(grad_ptr.dtype.element_ty), mask=idl >= 0)


def _unit_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def row_stats(
    logits: Tensor, labels_local: Tensor, ids_local: Tensor | None, inv_temp: float, topk: int
) -> tuple[LocalStats, Tensor | None, Tensor | None]:
    """See ``torch_backend.row_stats``; one kernel pass over the shard (+ the candidate pass for top-k)."""
    logits = _unit_stride(logits)
    n, v = logits.shape
    block = _block_v(v)
    group = _group_size(v, topk, block) if topk else 1
    if topk and not group:  # shard narrower than ~2k: no groups to skip, the chunked torch path is as good
        return torch_backend.row_stats(logits, labels_local, ids_local, inv_temp, topk)
    dev = logits.device
    stats = torch.empty(n, 4, dtype=torch.float32, device=dev)
    k_ids = 0 if ids_local is None else ids_local.shape[1]
    ids_x = torch.empty(n, k_ids, dtype=torch.float32, device=dev) if k_ids else stats
    ids_arg = ids_local if k_ids else labels_local
    n_groups = triton.cdiv(v, group)
    gmax = torch.empty(n, n_groups, dtype=torch.float32, device=dev) if topk else stats
    if n:
        _row_stats_kernel[(n,)](
            logits,
            logits.stride(0),
            labels_local,
            ids_arg,
            ids_arg.stride(0),
            stats,
            ids_x,
            gmax,
            gmax.stride(0),
            v,
            k_ids,
            n_groups,
            inv_temp,
            BLOCK_V=block,
            BLOCK_K=triton.next_power_of_2(max(k_ids, 1)),
            GROUP=group,
            HAS_IDS=bool(k_ids),
            WRITE_GROUP_MAX=bool(topk),
            num_warps=_num_warps(),
        )
    local = LocalStats(stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], ids_x if k_ids else None)
    if not topk:
        return local, None, None
    groups = torch.topk(gmax, topk, dim=1).indices.contiguous()
    top_x = torch.empty(n, topk, dtype=torch.float32, device=dev)
    top_col = torch.empty(n, topk, dtype=torch.int64, device=dev)
    if n:
        _topk_candidates_kernel[(n,)](
            logits,
            logits.stride(0),
            groups,
            top_x,
            top_col,
            v,
            topk,
            inv_temp,
            K_POW=max(2, triton.next_power_of_2(topk)),  # tl.topk needs at least 2
            GROUP=group,
            num_warps=_num_warps(),
        )
    return local, top_x, top_col


def grad_logits(
    logits: Tensor,
    labels_local: Tensor,
    ids_local: Tensor | None,
    row_vals: Tensor,
    g_ids: Tensor | None,
    inv_temp: float,
) -> Tensor:
    """See ``torch_backend.grad_logits``; one kernel pass reading the logits and writing dlogits."""
    logits = _unit_stride(logits)
    n, v = logits.shape
    grad = torch.empty(n, v, dtype=logits.dtype, device=logits.device)
    k_ids = 0 if ids_local is None else ids_local.shape[1]
    ids_arg = ids_local if k_ids else labels_local
    if n:
        _grad_kernel[(n,)](
            logits,
            logits.stride(0),
            grad,
            grad.stride(0),
            labels_local,
            ids_arg,
            ids_arg.stride(0),
            row_vals,
            g_ids.contiguous() if k_ids else row_vals,
            v,
            k_ids,
            inv_temp,
            BLOCK_V=_block_v(v),
            BLOCK_K=triton.next_power_of_2(max(k_ids, 1)),
            HAS_IDS=bool(k_ids),
            num_warps=_num_warps(),
        )
    return grad
