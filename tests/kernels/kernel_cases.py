"""Shared inputs and float64 checks for the kernel tests (also imported by spawned TP ranks)."""

from __future__ import annotations

import io
import os

import torch
import torch.distributed as dist

from megatron_opd.kernels import (
    linear_logprob_loss,
    linear_token_logprobs,
    linear_topk_logprobs,
    token_logprobs,
    topk_logprobs,
)
from megatron_opd.kernels.token_logprobs import token_logprobs_reference
from megatron_opd.selftest.tolerance import logprob_grad_atol


def make_case(
    seed: int,
    n: int,
    v: int,
    k: int | None,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 3.0,
    neg_inf: bool = False,
    ignore: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits [n, v] (distinct values), labels [n] with ignored rows, ids [n, k] with a duplicate and a padded id."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore and n > 1:
        labels[1] = -100
    if neg_inf:
        logits[0, : v // 3] = -torch.inf
        logits[0, v - 1] = -torch.inf
        labels[0] = 0  # a -inf label logit: log p = -inf, no NaN gradient
        if n > 2:
            logits[2, v // 2 :] = -torch.inf  # every column of the second TP half -inf in this row
    ids = None
    if k is not None:
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        if k > 1 and n > 3:
            ids[3, 1] = ids[3, 0]  # duplicate support entry
        if k > 2 and n > 2:
            ids[2, 2] = -1  # padded support entry
        if k < v and n > 4 and labels[4] >= 0:
            ids[4, 0] = labels[4]  # the sampled token inside the support
    return logits, labels, ids


def loss_weights(n: int, k: int | None, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, generator=g),
        torch.randn(n, generator=g),
        None if k is None else torch.randn(n, k, generator=g),
    )


def weighted_sum(out, weights) -> torch.Tensor:
    """A loss touching all three outputs; -inf outputs are excluded (their gradient is still checked to be 0)."""
    total = torch.zeros((), dtype=torch.float64)
    for value, w in zip(out, weights):
        if value is None:
            continue
        keep = torch.isfinite(value)
        total = total + torch.where(keep, value.double() * w.double(), 0.0).sum()
    return total


def row_loss_of(n: int, k: int | None):
    """``weighted_sum``'s per-row terms, as the ``row_loss`` of ``linear_logprob_loss`` (finite outputs)."""
    weights = loss_weights(n, k)

    def row_loss(out, rows: slice) -> torch.Tensor:
        w_label, w_entropy, w_ids = (None if w is None else w[rows].to(out.entropy) for w in weights)
        loss = out.label_logprob * w_label + out.entropy * w_entropy
        return loss if out.ids_logprob is None else loss + (out.ids_logprob * w_ids).sum(1)

    return row_loss


def reference_with_grad(logits, labels, ids, temperature: float):
    """Float64 outputs and d(weighted_sum)/d(logits), computed from the same input values."""
    z = logits.detach().double().requires_grad_(True)
    ref = token_logprobs_reference(z, labels, ids, temperature=temperature)
    weighted_sum(ref, loss_weights(labels.shape[0], None if ids is None else ids.shape[1])).backward()
    return ref, z.grad


def ours_with_grad(logits, labels, ids, temperature: float, **kw):
    z = logits.detach().clone().requires_grad_(True)
    out = token_logprobs(z, labels, ids, temperature=temperature, **kw)
    weighted_sum(out, loss_weights(labels.shape[0], None if ids is None else ids.shape[1])).backward()
    return out, z.grad


def make_linear_case(seed: int, n: int, h: int, v: int, k: int | None, dtype: torch.dtype):
    """Hidden states [n, h] and an LM-head weight [v, h] whose logits have std ~3; labels/ids as ``make_case``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 3 / h**0.5).to(dtype)
    _, labels, ids = make_case(seed, n, v, k, ignore=True)
    return hidden, weight, labels, ids


def linear_reference_with_grad(hidden, weight, labels, ids, temperature: float):
    """Float64 reference of the fused LM head: logits rounded to the inputs' dtype as the matmul does (values),
    differentiated as the exact product (straight-through rounding)."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    exact = h @ w.t()
    logits = exact + (exact.detach().to(hidden.dtype).double() - exact.detach())
    ref = token_logprobs_reference(logits, labels, ids, temperature=temperature)
    weighted_sum(ref, loss_weights(labels.shape[0], None if ids is None else ids.shape[1])).backward()
    return ref, h.grad, w.grad


def linear_ours_with_grad(hidden, weight, labels, ids, temperature: float, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = linear_token_logprobs(h, w, labels, ids, temperature=temperature, **kw)
    weighted_sum(out, loss_weights(labels.shape[0], None if ids is None else ids.shape[1])).backward()
    return out, h.grad, w.grad


def assert_close_outputs(out, ref, atol: float) -> None:
    for name, a, b in zip(("label_logprob", "entropy", "ids_logprob"), out, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32, name
        same_inf = torch.isinf(a) == torch.isinf(b)
        assert same_inf.all(), f"{name}: -inf pattern differs"
        fin = torch.isfinite(b)
        torch.testing.assert_close(a.double()[fin], b[fin], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def assert_close_grad(grad, ref_grad, dtype: torch.dtype, scale: float) -> None:
    """Within ``logprob_grad_atol`` of the float64 gradient: ``LOGPROB_ULPS`` fp32 ulps of max |gradient| × scale,
    plus one ulp of ``dtype`` at max |gradient| when it is not fp32."""
    assert grad.dtype == dtype
    assert torch.isfinite(grad).all()
    tol = logprob_grad_atol(ref_grad.abs().max().item(), scale, dtype)
    torch.testing.assert_close(grad.double(), ref_grad, atol=tol, rtol=0)


LINEAR_TOPK = 4  # k of the fused LM-head scoring in the TP world


def tp_worker(cases: list[tuple], linear_cases: list[tuple]) -> bytes:
    """One TP rank. For each ``(backend, logits, labels, ids, temperature, k, splits)``: its shard's outputs,
    gradient and global top-k (even split, or ``splits`` widths); for each ``(backend, hidden, weight, labels, ids,
    temperature, chunk)``: the fused LM head's outputs and gradients with this rank's (even) weight shard (backward
    in column chunks of ``chunk`` too), its top-``LINEAR_TOPK`` scoring, and ``linear_logprob_loss`` of the same
    weighted sum.
    Serialized: tensors sent through the result queue would be shared by file descriptor with a process that has
    exited."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for backend, logits, labels, ids, temperature, k, splits in cases:
        os.environ["OPD_KERNELS"] = backend
        v = logits.shape[1]
        widths = splits or [v // world] * world
        start = sum(widths[:rank])
        shard = logits[:, start : start + widths[rank]].contiguous()
        kw = dict(tp_group=dist.group.WORLD, vocab_start=start if splits else None)
        out, grad = ours_with_grad(shard, labels, ids, temperature, **kw)
        top = topk_logprobs(shard, k, temperature=temperature, **kw)
        results.append({"out": [None if t is None else t.detach() for t in out], "grad": grad, "topk": top})
    for backend, hidden, weight, labels, ids, temperature, chunk in linear_cases:
        os.environ["OPD_KERNELS"] = backend
        w = weight.chunk(world)[rank].contiguous()
        kw = dict(tp_group=dist.group.WORLD, chunk_tokens=chunk)
        out, d_h, d_w = linear_ours_with_grad(hidden, w, labels, ids, temperature, chunk_columns=chunk, **kw)
        scores = linear_topk_logprobs(hidden, w, labels, LINEAR_TOPK, ids, temperature=temperature, **kw)
        h_, w_ = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
        row_loss = row_loss_of(hidden.shape[0], None if ids is None else ids.shape[1])
        loss, _ = linear_logprob_loss(h_, w_, labels, row_loss, ids, temperature=temperature, **kw)
        loss.backward()
        results.append(
            {
                "out": [None if t is None else t.detach() for t in out],
                "d_hidden": d_h,
                "d_weight": d_w,
                "topk": list(scores),
                "loss": (loss.detach(), h_.grad, w_.grad),
            }
        )
    buf = io.BytesIO()
    torch.save(results, buf)
    return buf.getvalue()


def load_result(payload: bytes) -> list[dict]:
    return torch.load(io.BytesIO(payload))
