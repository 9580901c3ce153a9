"""The Triton implementation of ``backend.VocabBackend`` (docs/objectives.md §1-§5). Why the kernels are shaped this
way, against the H200 measurements, is in docs/kernels.md ("Reaching the HBM floor").

The streaming kernels give each program ``ROWS`` consecutive rows and walk them as one sequence of ``BLOCK_V``-wide
tiles, loading tile t+1 before working on tile t (also across row boundaries), so a program always has its next tile
in flight; what is row-sized but not streamed (labels, ids and the logits there) is read before the stream starts.
The math is in base 2 (``exp2``, the GPU's native exponential) on ``z - max`` (exact for large logits):

- ``_forward_kernel``: online softmax with per-lane running sums (the only per-tile reduction is the max, and the sums
  are only rescaled when it grows); x at the labels and ids. With ``K_POW > 0`` (top-k) it also stores the max of
  every ``GROUP`` consecutive logits (in the logits' dtype: exact for a max) and, at the end of each row, selects
  the row's exact top-k from them (``_select_topk``): the k best groups (by their max, ties to the lower index)
  hold the top-k, since a logit outside them is beaten by their k maxima; then the k best sub-groups of those
  groups, then the k best logits of those. Each selection counts rather than sorts: the k-th largest value is found
  bit by bit (at most 16 counting passes for bf16), and the winners are packed in column order by a prefix sum.
- ``_grad_kernel_body``: ``dz = p·(A0 + A1·log2 p)`` in one read and one write; the label and ids positions are then
  rewritten with their full coefficients (duplicates summed in registers, so every writer of a position writes the
  same value), from logits read before the stream — so the gradient may overwrite the logits (``out=logits``).

Configs: ``triton.autotune`` over the tile width, warps and rows per program (``CONFIGS``), keyed by the shard width,
dtypes and flags, so each GPU picks its own (once per key; the timings are cached on disk with Triton's kernels).
Triton's autotuner cannot benchmark in the interpreter, so there — and whenever ``OPD_TRITON_BLOCK_V`` /
``OPD_TRITON_NUM_WARPS`` / ``OPD_TRITON_ROWS`` pin one — a single config is launched directly (the tests run every
config of the space that way).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_opd.kernels import torch_backend
from megatron_opd.kernels.backend import LocalStats

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_D_MIN = tl.constexpr(-1e30)  # floor for exp2 arguments: exp2 gives 0 and 0·(-1e30) = 0, where -inf would give NaN

# (BLOCK_V, num_warps): 8 or 16 logits per thread, i.e. one or two 16-byte loads of bf16 per tile
TILES = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32))
ROWS_PER_PROGRAM = (1, 4)
MAX_ROW_RUN = 1 << 18  # several rows per program only while ROWS·V stays below this many logits (short rows)
MAX_GROUP = 256  # logits per top-k group
MAX_SELECT = 16384  # group maxima + candidates one program selects from (< 2^16, counted in half an int32);
# beyond (k in the thousands) the torch path
CONFIGS = [triton.Config({"BLOCK_V": b, "ROWS": r}, num_warps=w) for b, w in TILES for r in ROWS_PER_PROGRAM]
PIN_DEFAULTS = {"BLOCK_V": 4096, "num_warps": 8, "ROWS": 1}


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles far wider than the row, tiles narrower than a top-k group, and several rows per program where
    rows are long (nothing to amortize) or select a top-k (its registers would cost occupancy)."""
    args = {**named_args, **kwargs}
    v, topk = args["V"], bool(args.get("K_POW"))
    width = max(TILES[0][0], triton.next_power_of_2(v))
    kept = [
        c
        for c in configs
        if args.get("GROUP", 1) * topk <= c.kwargs["BLOCK_V"] <= width
        and (c.kwargs["ROWS"] == 1 or (not topk and c.kwargs["ROWS"] * v <= MAX_ROW_RUN))
    ]
    return kept or configs[:1]


def pinned_config() -> triton.Config | None:
    """The config ``OPD_TRITON_BLOCK_V`` / ``OPD_TRITON_NUM_WARPS`` / ``OPD_TRITON_ROWS`` pin (unset ones from
    ``PIN_DEFAULTS``), or ``None`` when none is set."""
    env = {"BLOCK_V": "OPD_TRITON_BLOCK_V", "num_warps": "OPD_TRITON_NUM_WARPS", "ROWS": "OPD_TRITON_ROWS"}
    if not any(os.environ.get(name) for name in env.values()):
        return None
    values = {key: int(os.environ.get(name) or PIN_DEFAULTS[key]) for key, name in env.items()}
    for key, value in values.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{env[key]}={value}: must be a power of two >= 1; unset it to autotune.")
    return triton.Config({"BLOCK_V": values["BLOCK_V"], "ROWS": values["ROWS"]}, num_warps=values["num_warps"])


def _launch(kernel: triton.runtime.Autotuner, n_rows: int, args: dict) -> None:
    """Run ``kernel`` over ``n_rows`` rows: through its autotuner on a GPU; with one config where the autotuner cannot
    benchmark (the interpreter) or one is pinned."""
    config = pinned_config()
    if config is None and triton.knobs.runtime.interpret:
        prune = kernel.early_config_prune
        config = (prune(kernel.configs, {}, **args) if prune else kernel.configs)[0]
    if config is None:
        kernel[lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)](**args)
        return
    params = {k: v for k, v in config.kwargs.items() if k in kernel.arg_names}
    kernel.fn[(triton.cdiv(n_rows, params["ROWS"]),)](**args, **params, num_warps=config.num_warps)


def chosen_configs() -> dict[str, str]:
    """The config each autotuned kernel ran with last (benchmark records; empty before the first tuned launch)."""
    kernels = {"forward": _forward_kernel, "grad": _grad_kernel, "grad_in_place": _grad_kernel_in_place}
    return {name: str(k.best_config) for name, k in kernels.items() if getattr(k, "best_config", None) is not None}


def _autotune(configs: list[triton.Config], key: list[str], **kw) -> Callable:
    """``triton.autotune`` with ``_prune``; the timings are kept in Triton's cache, so later runs skip the tuning."""
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": _prune}, cache_results=True, **kw
    )


@triton.jit
def _order_key(value, KEY_BITS: tl.constexpr):
    """int32 with the order of the fp32 ``value``s, keeping their KEY_BITS high bits (all bits of a value that came
    from bf16 (16) or fp16 (19)); -inf maps above ``-2^(KEY_BITS-1)``, the key ``_take_k`` gives invalid entries."""
    bits = tl.where(value == 0, 0.0, value).to(tl.int32, bitcast=True)  # -0.0 ties with +0.0
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) >> (32 - KEY_BITS)


@triton.jit
def _take_k(key, valid, k, KEY_BITS: tl.constexpr):
    """For a 1-D ``key``: the mask of exactly ``min(k, #valid)`` entries — those above the k-th largest valid key and
    the lowest-indexed ones equal to it — and each one's slot (rank in index order). The threshold is found bit by
    bit from the top by counting (no sorting; a 16-bin histogram per 4 bits takes as many instructions on sm_90 and
    twice the registers), stopping early once exactly k keys reach it."""
    lo = -(1 << (KEY_BITS - 1))  # below every valid key
    key = tl.where(valid, key, lo)
    t = tl.full([], lo, tl.int64)  # the largest t with #(key >= t) >= k so far
    bit = KEY_BITS - 1
    count = k + 1
    while (bit >= 0) & (count != k):
        cand = t + (tl.full([], 1, tl.int64) << bit)
        count = tl.sum((key >= cand.to(tl.int32)).to(tl.int32), axis=0)
        t = tl.where(count >= k, cand, t)
        bit -= 1
    theta = t.to(tl.int32)
    above = key > theta
    tie = (key == theta) & valid
    # one prefix sum counts both (ties in the high half): slots go to the keys above and the first `need` ties
    ranks = tl.cumsum((tie.to(tl.int32) << 16) | above.to(tl.int32), axis=0)
    need = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & ((ranks >> 16) <= need))
    return take, (ranks & 0xFFFF) + tl.minimum(ranks >> 16, need) - 1


@triton.jit
def _select_topk(
    base,
    gmax_row,
    top_x_row,
    top_col_row,
    V,
    n_groups,
    k,
    inv_temp,
    K_POW: tl.constexpr,
    GROUP: tl.constexpr,
    SUB: tl.constexpr,
    NG_POW: tl.constexpr,
    KEY_BITS: tl.constexpr,
):
    """The row's top-k ``x`` and columns, in column order, from its group maxima (stored by this program): the k best
    groups, the k best sub-groups (SUB logits) of theirs, the k best logits of those. Each step keeps the whole top-k:
    outside the k best blocks of a contiguous partition (by max, ties to the lower index), a logit is beaten by the k
    block maxima. The output row holds the chosen block positions in between."""
    tl.debug_barrier()  # the row's group maxima, stored by every thread, are visible
    q = tl.arange(0, K_POW)
    g = tl.arange(0, NG_POW)
    gv = tl.load(gmax_row + g, mask=g < n_groups, other=-float("inf")).to(tl.float32)
    take, slot = _take_k(_order_key(gv, KEY_BITS), g < n_groups, k, KEY_BITS)
    tl.store(top_col_row + slot, (g * GROUP).to(tl.int64), mask=take)
    live = q < tl.sum(take.to(tl.int32), axis=0)
    tl.debug_barrier()
    first = tl.load(top_col_row + q, mask=live, other=0).to(tl.int32)  # first column of each chosen group
    sub = tl.reshape(first[:, None] + (tl.arange(0, GROUP // SUB) * SUB)[None, :], (K_POW * (GROUP // SUB),))
    ok = tl.reshape(tl.broadcast_to(live[:, None], (K_POW, GROUP // SUB)), (K_POW * (GROUP // SUB),)) & (sub < V)
    cols = sub[:, None] + tl.arange(0, SUB)[None, :]
    z = tl.load(base + cols, mask=ok[:, None] & (cols < V), other=-float("inf")).to(tl.float32)
    take, slot = _take_k(_order_key(tl.max(z, axis=1), KEY_BITS), ok, k, KEY_BITS)
    tl.debug_barrier()  # every thread has read the group positions
    tl.store(top_col_row + slot, sub.to(tl.int64), mask=take)
    live = q < tl.sum(take.to(tl.int32), axis=0)
    tl.debug_barrier()
    first = tl.load(top_col_row + q, mask=live, other=0).to(tl.int32)  # first column of each chosen sub-group
    cols = tl.reshape(first[:, None] + tl.arange(0, SUB)[None, :], (K_POW * SUB,))
    ok = tl.reshape(tl.broadcast_to(live[:, None], (K_POW, SUB)), (K_POW * SUB,)) & (cols < V)
    z = tl.load(base + cols, mask=ok, other=-float("inf")).to(tl.float32)
    take, slot = _take_k(_order_key(z, KEY_BITS), ok, k, KEY_BITS)
    tl.debug_barrier()  # every thread has read the sub-group positions
    tl.store(top_x_row + slot, z * inv_temp, mask=take)
    tl.store(top_col_row + slot, cols.to(tl.int64), mask=take)
    pad = (q >= tl.sum(take.to(tl.int32), axis=0)) & (q < k)  # fewer than k logits in the shard
    tl.store(top_x_row + q, tl.full([K_POW], -float("inf"), tl.float32), mask=pad)
    tl.store(top_col_row + q, tl.full([K_POW], -1, tl.int64), mask=pad)


@triton.jit
def _program_targets(
    logits_ptr, stride_z, labels_ptr, ids_ptr, stride_ids, N, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr
):
    """This program's rows and the logits at their labels and ids, read before its stream: ``(row0, end, rows [ROWS],
    labels, z at the labels, ids [ROWS, BLOCK_K], z at the ids)`` (-1 / 0 where absent; ``K = 0``: no ids)."""
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    end = tl.minimum(row0 + ROWS, N)
    rows = row0 + tl.arange(0, ROWS)
    live = rows < end
    lab = tl.load(labels_ptr + rows, mask=live, other=-1)
    lab_z = tl.load(logits_ptr + rows * stride_z + tl.maximum(lab, 0), mask=lab >= 0, other=0.0).to(tl.float32)
    kk = tl.arange(0, BLOCK_K)
    mask = live[:, None] & (kk[None, :] < K)
    ids = tl.load(ids_ptr + rows[:, None] * stride_ids + kk[None, :], mask=mask, other=-1)
    ids_z = tl.load(logits_ptr + rows[:, None] * stride_z + tl.maximum(ids, 0), mask=ids >= 0, other=0.0)
    return row0, end, rows, lab, lab_z, ids, ids_z.to(tl.float32)


@triton.jit
def _load_next_tile(logits_ptr, stride_z, row, j, n_tiles, end, V, offs, BLOCK_V: tl.constexpr):
    """The tile after tile ``j`` of ``row``: the next of the row, or the first of the next row (none past ``end``)."""
    last = j == n_tiles - 1
    cols = tl.where(last, 0, (j + 1) * BLOCK_V) + offs
    row = tl.where(last, row + 1, row)
    return tl.load(logits_ptr + row * stride_z + cols, mask=(cols < V) & (row < end), other=-float("inf"))


@_autotune(CONFIGS, key=["V", "HAS_IDS", "BLOCK_K", "K_POW"])
@triton.jit
def _forward_kernel(
    logits_ptr,
    stride_z,
    labels_ptr,
    ids_ptr,
    stride_ids,
    stats_ptr,  # [N, 4] fp32: max of z, Σ exp(x - max x), Σ exp(x - max x)·(x - max x), x at the label
    ids_x_ptr,  # [N, K] fp32: x at the ids
    gmax_ptr,  # [N, n_groups] in the logits' dtype: max of each GROUP consecutive z (top-k)
    stride_g,
    top_x_ptr,  # [N, k] fp32: the shard's top-k x, in column order (top-k)
    top_col_ptr,  # [N, k] int64: their columns, -1 past the shard's width
    N,
    V,
    K,
    k,
    n_groups,
    inv_temp,
    BLOCK_V: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_IDS: tl.constexpr,
    K_POW: tl.constexpr,  # 0: no top-k
    GROUP: tl.constexpr,
    SUB: tl.constexpr,
    NG_POW: tl.constexpr,
    KEY_BITS: tl.constexpr,
):
    row0, end, rows, _, lab_z, _, id_z = _program_targets(
        logits_ptr, stride_z, labels_ptr, ids_ptr, stride_ids, N, K, ROWS, BLOCK_K
    )
    tl.store(stats_ptr + rows * 4 + 3, lab_z * inv_temp, mask=rows < end)
    if HAS_IDS:
        kk = tl.arange(0, BLOCK_K)
        mask = (rows < end)[:, None] & (kk[None, :] < K)
        tl.store(ids_x_ptr + rows[:, None] * K + kk[None, :], id_z * inv_temp, mask=mask)
    c = inv_temp * LOG2E
    n_tiles = tl.cdiv(V, BLOCK_V)
    offs = tl.arange(0, BLOCK_V)
    nxt = tl.load(logits_ptr + row0 * stride_z + offs, mask=offs < V, other=-float("inf"))
    for row in range(row0, end):
        m = -float("inf")  # running max of z over the row so far
        s = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane: Σ 2^d, d = (z - m)·c
        a = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane: Σ 2^d·d
        for j in range(n_tiles):
            z = nxt.to(tl.float32)
            nxt = _load_next_tile(logits_ptr, stride_z, row, j, n_tiles, end, V, offs, BLOCK_V)
            if K_POW:
                gm = tl.max(tl.reshape(z, (BLOCK_V // GROUP, GROUP)), axis=1)
                gi = j * (BLOCK_V // GROUP) + tl.arange(0, BLOCK_V // GROUP)
                tl.store(gmax_ptr + row * stride_g + gi, gm.to(gmax_ptr.dtype.element_ty), mask=gi * GROUP < V)
                tile_max = tl.max(gm, axis=0)
            else:
                tile_max = tl.max(z, axis=0)
            if tile_max > m:  # rescale the sums to the new max (rare once the row's large logits have been seen)
                shift = tl.where(m == -float("inf"), 0.0, (m - tile_max) * c)
                alpha = tl.math.exp2(shift)
                a = alpha * (a + shift * s)
                s = alpha * s
                m = tile_max
            d = tl.maximum((z - tl.where(m == -float("inf"), 0.0, m)) * c, _D_MIN)
            e = tl.math.exp2(d)
            s += e
            a += e * d
        tl.store(stats_ptr + row * 4, m)
        tl.store(stats_ptr + row * 4 + 1, tl.sum(s, axis=0))
        tl.store(stats_ptr + row * 4 + 2, tl.sum(a, axis=0) * LN2)
        if K_POW:
            _select_topk(
                logits_ptr + row * stride_z,
                gmax_ptr + row * stride_g,
                top_x_ptr + row * k,
                top_col_ptr + row * k,
                V,
                n_groups,
                k,
                inv_temp,
                K_POW,
                GROUP,
                SUB,
                NG_POW,
                KEY_BITS,
            )


@triton.jit
def _grad_kernel_body(
    logits_ptr,
    stride_z,
    grad_ptr,  # may be logits_ptr
    stride_gz,
    labels_ptr,
    ids_ptr,
    stride_ids,
    row_vals_ptr,  # [N, 6]: max of z, log-sum, H, G, g_H, g_label
    g_ids_ptr,  # [N, K]
    N,
    V,
    K,
    inv_temp,
    BLOCK_V: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # the label and ids positions of all rows and their logits, read before any gradient is written
    row0, end, rows, lab, lab_z, idl, id_z = _program_targets(
        logits_ptr, stride_z, labels_ptr, ids_ptr, stride_ids, N, K, ROWS, BLOCK_K
    )
    kk = tl.arange(0, BLOCK_K)
    g_id = tl.load(
        g_ids_ptr + rows[:, None] * K + kk[None, :], mask=(rows < end)[:, None] & (kk[None, :] < K), other=0.0
    )
    c = inv_temp * LOG2E
    n_tiles = tl.cdiv(V, BLOCK_V)
    offs = tl.arange(0, BLOCK_V)
    nxt = tl.load(logits_ptr + row0 * stride_z + offs, mask=offs < V, other=-float("inf"))
    for row in range(row0, end):
        vals = row_vals_ptr + row * 6
        m = tl.load(vals)
        m = tl.where(m == -float("inf"), 0.0, m)
        log_sum2 = tl.load(vals + 1) * LOG2E
        g_ent = tl.load(vals + 4)
        a0 = -inv_temp * (tl.load(vals + 3) + g_ent * tl.load(vals + 2))  # dz = p·(a0 + a1·log2 p)
        a1 = -inv_temp * LN2 * g_ent
        out = grad_ptr + row * stride_gz
        for j in range(n_tiles):
            z = nxt.to(tl.float32)
            nxt = _load_next_tile(logits_ptr, stride_z, row, j, n_tiles, end, V, offs, BLOCK_V)
            d = tl.maximum((z - m) * c - log_sum2, _D_MIN)
            p = tl.math.exp2(d)
            cols = j * BLOCK_V + offs
            tl.store(out + cols, (p * (a0 + a1 * d)).to(grad_ptr.dtype.element_ty), mask=cols < V)
        # after all dense writes of the row (barrier), rewrite its ids and label positions with their full
        # coefficients; duplicates get identical values, and the label is written only when no id covers it
        sel = (rows == row)[:, None]
        ids = tl.max(tl.where(sel, idl, -1), axis=0)
        zk = tl.sum(tl.where(sel, id_z, 0.0), axis=0)
        y = tl.max(tl.where(rows == row, lab, -1), axis=0)
        zy = tl.sum(tl.where(rows == row, lab_z, 0.0), axis=0)
        g_lab = tl.load(vals + 5)
        gk = tl.sum(tl.where(sel, g_id, 0.0), axis=0)
        coef = tl.sum(tl.where(ids[:, None] == ids[None, :], gk[None, :], 0.0), axis=1)
        coef += tl.where(ids == y, g_lab, 0.0)
        dk = tl.maximum((zk - m) * c - log_sum2, _D_MIN)
        dy = tl.maximum((zy - m) * c - log_sum2, _D_MIN)
        vk = tl.math.exp2(dk) * (a0 + a1 * dk) + coef * inv_temp
        vy = tl.math.exp2(dy) * (a0 + a1 * dy) + g_lab * inv_temp
        covered = tl.sum((ids == y).to(tl.int32), axis=0) > 0
        tl.debug_barrier()
        gty = grad_ptr.dtype.element_ty
        tl.store(out + tl.maximum(ids, 0), vk.to(gty), mask=ids >= 0)
        tl.store(out + tl.maximum(y, 0), vy.to(gty), mask=(y >= 0) & ~covered)


# The same kernel tuned twice: writing over the logits, the autotuner must restore them after each timed run (a copy
# of the buffer while it tunes, a chunk of the fused LM head); writing a new gradient, nothing needs restoring.
_grad_kernel = _autotune(CONFIGS, key=["V", "BLOCK_K"])(_grad_kernel_body)
_grad_kernel_in_place = _autotune(CONFIGS, key=["V", "BLOCK_K"], restore_value=["grad_ptr"])(_grad_kernel_body)


def _unit_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def topk_sizes(v: int, k: int, block_v: int | None = None) -> dict[str, int]:
    """The top-k constants for shard width ``v``: ``GROUP`` logits per group, chosen to minimize the group maxima
    (padded to ``NG_POW``; written and read back) plus the ``K_POW x GROUP`` logits read again (ties: the wider group),
    at most ``block_v`` (a tile holds whole groups); ``SUB`` ≈ √GROUP logits per sub-group."""
    k_pow = max(2, triton.next_power_of_2(k))
    widest = min(MAX_GROUP, block_v or TILES[0][0])
    best: dict[str, int] = {}
    for group in (1 << e for e in range(1, widest.bit_length())):
        n_groups = triton.cdiv(v, group)
        ng_pow = triton.next_power_of_2(n_groups)
        if not best or ng_pow + k_pow * group <= best["NG_POW"] + best["K_POW"] * best["GROUP"]:
            best = {"K_POW": k_pow, "GROUP": group, "NG_POW": ng_pow, "n_groups": n_groups}
    return best | {"SUB": 1 << (best["GROUP"].bit_length() - 1) // 2}


def _key_bits(dtype: torch.dtype) -> int:
    """High bits of an fp32 that hold every value of ``dtype`` (bf16: 8 exponent + 7 mantissa + sign)."""
    return {torch.bfloat16: 16, torch.float16: 19}.get(dtype, 32)


def row_stats(
    logits: Tensor, labels_local: Tensor, ids_local: Tensor | None, inv_temp: float, topk: int
) -> tuple[LocalStats, Tensor | None, Tensor | None]:
    """See ``backend.VocabBackend.row_stats``; one kernel pass over the shard (+ k·GROUP logits read again for
    top-k); the top-k come out in column order and are sorted here."""
    pinned = pinned_config()
    sizes = topk_sizes(logits.shape[1], topk, pinned.kwargs["BLOCK_V"] if pinned else None) if topk else {}
    if topk and sizes["NG_POW"] + sizes["K_POW"] * sizes["GROUP"] > MAX_SELECT:  # a k of thousands: rare
        return torch_backend.row_stats(logits, labels_local, ids_local, inv_temp, topk)
    logits = _unit_stride(logits)
    n, v = logits.shape
    dev = logits.device
    stats = torch.empty(n, 4, dtype=torch.float32, device=dev)
    k_ids = 0 if ids_local is None else ids_local.shape[1]
    ids_x = torch.empty(n, k_ids, dtype=torch.float32, device=dev) if k_ids else stats
    ids_arg = ids_local if k_ids else labels_local.view(-1, 1)
    gmax = torch.empty(n, sizes["n_groups"], dtype=logits.dtype, device=dev) if topk else logits
    top_x = torch.empty(n, topk, dtype=torch.float32, device=dev) if topk else stats
    top_col = torch.empty(n, topk, dtype=torch.int64, device=dev) if topk else labels_local
    if n:
        args = dict(
            logits_ptr=logits,
            stride_z=logits.stride(0),
            labels_ptr=labels_local,
            ids_ptr=ids_arg,
            stride_ids=ids_arg.stride(0),
            stats_ptr=stats,
            ids_x_ptr=ids_x,
            gmax_ptr=gmax,
            stride_g=gmax.stride(0),
            top_x_ptr=top_x,
            top_col_ptr=top_col,
            N=n,
            V=v,
            K=k_ids,
            k=topk,
            n_groups=sizes.get("n_groups", 1),
            inv_temp=inv_temp,
            BLOCK_K=triton.next_power_of_2(max(k_ids, 1)),
            HAS_IDS=bool(k_ids),
            K_POW=sizes.get("K_POW", 0),
            GROUP=sizes.get("GROUP", 1),
            SUB=sizes.get("SUB", 1),
            NG_POW=sizes.get("NG_POW", 1),
            KEY_BITS=_key_bits(logits.dtype),
        )
        _launch(_forward_kernel, n, args)
    local = LocalStats(stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], ids_x if k_ids else None)
    if not topk:
        return local, None, None
    top_x, order = torch.sort(top_x, dim=1, descending=True, stable=True)  # ties keep the column order
    return local, top_x, top_col.gather(1, order)


def grad_logits(
    logits: Tensor,
    labels_local: Tensor,
    ids_local: Tensor | None,
    row_vals: Tensor,
    g_ids: Tensor | None,
    inv_temp: float,
    out: Tensor | None = None,
) -> Tensor:
    """See ``backend.VocabBackend.grad_logits``; one kernel pass reading the logits and writing the gradient."""
    logits = _unit_stride(logits)
    n, v = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    k_ids = 0 if ids_local is None else ids_local.shape[1]
    ids_arg = ids_local if k_ids else labels_local.new_full((n, 1), -1)
    g_arg = g_ids.contiguous() if k_ids else row_vals.new_zeros(n, 1)
    if n:
        args = dict(
            logits_ptr=logits,
            stride_z=logits.stride(0),
            grad_ptr=grad,
            stride_gz=grad.stride(0),
            labels_ptr=labels_local,
            ids_ptr=ids_arg,
            stride_ids=ids_arg.stride(0),
            row_vals_ptr=row_vals.contiguous(),
            g_ids_ptr=g_arg,
            N=n,
            V=v,
            K=max(k_ids, 1),
            inv_temp=inv_temp,
            BLOCK_K=triton.next_power_of_2(max(k_ids, 1)),
        )
        _launch(_grad_kernel_in_place if grad.data_ptr() == logits.data_ptr() else _grad_kernel, n, args)
    return grad
