"""The vocabulary-sized kernels against float64 torch on this device: token log-probs with entropy and
log-probs at K ids (values and gradients), the global top-k, the fused LM head and the top-K
divergences. On CUDA these are the compiled Triton kernels at Qwen3 vocabularies (151,936 and
37,984); on CPU the chunked torch path at small shapes.

Tolerances, from the dtype and the magnitude compared (``megatron_opd.selftest.tolerance``), with s = max |z/T|
over the logits (for the fused LM head: of h Wᵀ):

- log-probs, entropies and top-k log-probs (fp32 outputs): 32 fp32 ulps of s (log p = z/T − lse rounds at s);
  the fused LM head computes its logits in the input dtype: plus one ulp of that dtype at s;
- gradients w.r.t. logits: 32 fp32 ulps of s × max |g| (each probability is off by the log-probs' error relative
  to itself), plus one ulp of the gradient's dtype at max |g| when it is bf16;
- the fused LM head's gradients w.r.t. hidden states and weight, in relative norm: the log-probs' tolerance plus
  one ulp of the dtype (each term is a probability off by the former, rounded once more);
- divergences: 32 fp32 ulps of the largest |log p| they are computed from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from megatron_opd.kernels import (
    linear_token_logprobs,
    linear_topk_logprobs,
    support_divergence,
    token_logprobs,
    topk_logprobs,
)
from megatron_opd.kernels.divergence import support_divergence_reference
from megatron_opd.kernels.linear_topk import linear_topk_logprobs_reference
from megatron_opd.kernels.token_logprobs import token_logprobs_reference
from megatron_opd.kernels.topk import topk_logprobs_reference
from megatron_opd.selftest.tolerance import (
    LOGPROB_ULPS,
    linear_logit_scale,
    logit_scale,
    logprob_atol,
    logprob_grad_atol,
    ulps,
)


@dataclasses.dataclass(frozen=True)
class LogprobCase:
    n: int
    v: int
    k: int
    temperature: float


GPU_CASES = (LogprobCase(1000, 151936, 32, 1.0), LogprobCase(777, 37984, 64, 0.7), LogprobCase(64, 151936, 1, 1.3))
CPU_CASES = (LogprobCase(64, 4096, 32, 1.0), LogprobCase(33, 1000, 64, 0.7), LogprobCase(8, 4096, 1, 1.3))


def _logits(case: LogprobCase, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(case.n, case.v, generator=g, device=device) * 3).to(dtype)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def logprob_check(case: LogprobCase, dtype: torch.dtype, device: torch.device) -> Callable[[], tuple[str, dict]]:
    def check() -> tuple[str, dict[str, Any]]:
        logits = _logits(case, dtype, device, seed=case.n).requires_grad_()
        g = torch.Generator(device=device).manual_seed(1)
        labels = torch.randint(0, case.v, (case.n,), generator=g, device=device)
        labels[1] = -100  # an ignored row
        ids = torch.randint(0, case.v, (case.n, case.k), generator=g, device=device)
        w = [
            torch.randn(shape, generator=g, device=device, dtype=torch.float64)
            for shape in ((case.n,), (case.n,), ids.shape)
        ]
        out = token_logprobs(logits, labels, ids, temperature=case.temperature)
        ref_in = logits.detach().double().requires_grad_()
        ref = token_logprobs_reference(ref_in, labels, ids, temperature=case.temperature)
        errs = {
            name: _max_err(getattr(out, name), getattr(ref, name))
            for name in ("label_logprob", "entropy", "ids_logprob")
        }
        scale = logit_scale(logits.detach(), case.temperature)
        tol = logprob_atol(scale)
        for name, err in errs.items():
            assert err <= tol, f"{name} error {err:.2e} > {tol:.2e} ({LOGPROB_ULPS} fp32 ulps of max |z/T| {scale:.1f})"
        loss = sum((o.double() * wi).sum() for o, wi in zip(out, w))
        (grad,) = torch.autograd.grad(loss, logits)
        (ref_grad,) = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(ref, w)), ref_in)
        grad_err, ref_max = _max_err(grad, ref_grad), float(ref_grad.abs().max())
        grad_tol = logprob_grad_atol(ref_max, scale, dtype)
        assert grad_err <= grad_tol, (
            f"gradient error {grad_err:.2e} > {grad_tol:.2e} (largest reference gradient {ref_max:.2e})"
        )
        detail = (
            f"max err label {errs['label_logprob']:.1e} entropy {errs['entropy']:.1e} "
            f"ids {errs['ids_logprob']:.1e} (tol {tol:.1e}) grad {grad_err:.1e} (tol {grad_tol:.1e})"
        )
        return detail, {**errs, "tol": tol, "grad_max_abs_err": grad_err, "grad_ref_max": ref_max, "grad_tol": grad_tol}

    return check


def topk_check(case: LogprobCase, dtype: torch.dtype, device: torch.device) -> Callable[[], tuple[str, dict]]:
    def check() -> tuple[str, dict[str, Any]]:
        logits = _logits(case, dtype, device, seed=case.n + 1)
        ids, values = topk_logprobs(logits, case.k, temperature=case.temperature)
        ref_ids, ref_values = topk_logprobs_reference(logits, case.k, temperature=case.temperature)
        full = torch.log_softmax(logits.double() / case.temperature, dim=-1)
        val_err = _max_err(values, ref_values)
        id_err = _max_err(full.gather(1, ids), values)  # ties may pick other ids of the same log-prob
        tol = logprob_atol(logit_scale(logits, case.temperature))
        assert val_err <= tol, f"top-k log-prob error {val_err:.2e} > {tol:.2e}"
        assert id_err <= tol, f"the returned ids' log-probs differ from the returned values by {id_err:.2e} > {tol:.2e}"
        assert bool((values[:, 1:] <= values[:, :-1]).all()), "top-k values are not sorted descending"
        match = float((ids == ref_ids).float().mean())
        return f"max err values {val_err:.1e} ids {id_err:.1e} (tol {tol:.1e}), exact id match {match:.3f}", {
            "val_err": val_err,
            "id_val_err": id_err,
            "tol": tol,
            "exact_id_match": match,
        }

    return check


def linear_check(device: torch.device) -> Callable[[], tuple[str, dict]]:
    n, v, h = (1024, 151936, 2048) if device.type == "cuda" else (64, 4096, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def check() -> tuple[str, dict[str, Any]]:
        g = torch.Generator(device=device).manual_seed(2)
        hidden = (torch.randn(n, h, generator=g, device=device) / 4).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=g, device=device) / 8).to(dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g, device=device)
        out = linear_token_logprobs(hidden, weight, labels)
        ref_h, ref_w = (t.detach().double().requires_grad_() for t in (hidden, weight))
        ref = token_logprobs_reference(ref_h @ ref_w.T, labels)
        val_err = max(_max_err(out.label_logprob, ref.label_logprob), _max_err(out.entropy, ref.entropy))
        tol = logprob_atol(linear_logit_scale(hidden.detach(), weight.detach()), dtype)
        assert val_err <= tol, f"log-prob/entropy error {val_err:.2e} > {tol:.2e}"
        gh, gw = torch.autograd.grad((out.label_logprob.double() + out.entropy.double()).sum(), (hidden, weight))
        rh, rw = torch.autograd.grad((ref.label_logprob + ref.entropy).sum(), (ref_h, ref_w))
        rel = [float((a.double() - b).norm() / b.norm()) for a, b in ((gh, rh), (gw, rw))]
        rel_tol = tol + ulps(dtype, 1.0, 1)
        assert max(rel) <= rel_tol, f"gradient relative error {max(rel):.2e} > {rel_tol:.2e}"
        detail = (
            f"n={n} V={v} h={h} {str(dtype)[6:]}: err {val_err:.1e} (tol {tol:.1e}), "
            f"grad rel {rel[0]:.1e} / {rel[1]:.1e} (tol {rel_tol:.1e})"
        )
        return detail, {"val_err": val_err, "tol": tol, "rel_grad_h": rel[0], "rel_grad_w": rel[1], "rel_tol": rel_tol}

    return check


def linear_topk_check(device: torch.device) -> Callable[[], tuple[str, dict]]:
    """The fused LM head's scoring pass (top-K ids and log-probs, sampled-token log-prob, entropy) from hidden
    states, against float64 through the materialized logits."""
    n, v, h, k = (1024, 151936, 2048, 32) if device.type == "cuda" else (64, 4096, 64, 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def check() -> tuple[str, dict[str, Any]]:
        g = torch.Generator(device=device).manual_seed(4)
        hidden = (torch.randn(n, h, generator=g, device=device) / 4).to(dtype)
        weight = (torch.randn(v, h, generator=g, device=device) / 8).to(dtype)
        labels = torch.randint(0, v, (n,), generator=g, device=device)
        out = linear_topk_logprobs(hidden, weight, labels, k)
        ref = linear_topk_logprobs_reference(hidden, weight, labels, k)
        full = torch.log_softmax(hidden.double() @ weight.double().T, -1)
        errs = {
            "topk_logprobs": _max_err(out.logprobs, ref.logprobs),
            "ids": _max_err(full.gather(1, out.ids), ref.logprobs),  # ties may pick other ids of the same log-prob
            "label_logprob": _max_err(out.label_logprob, ref.label_logprob),
            "entropy": _max_err(out.entropy, ref.entropy),
        }
        tol = logprob_atol(linear_logit_scale(hidden, weight), dtype)
        worst = max(errs.values())
        assert worst <= tol, f"fused top-K scoring error {worst:.2e} > {tol:.2e}: {errs}"
        return f"n={n} V={v} h={h} K={k} {str(dtype)[6:]}: max err {worst:.1e} (tol {tol:.1e})", {**errs, "tol": tol}

    return check


def divergence_check(device: torch.device) -> Callable[[], tuple[str, dict]]:
    n, k = (4096, 32) if device.type == "cuda" else (256, 32)

    def check() -> tuple[str, dict[str, Any]]:
        g = torch.Generator(device=device).manual_seed(3)
        student = torch.log_softmax(torch.randn(n, 2 * k, generator=g, device=device), -1)[:, :k]
        teacher = torch.log_softmax(torch.randn(n, 2 * k, generator=g, device=device), -1)[:, :k]
        errs = {}
        for beta in (0.0, 0.5, 1.0):
            for renorm, tail in ((True, False), (False, True)):
                got = support_divergence(student, teacher, beta, renormalize=renorm, tail_bucket=tail)
                want = support_divergence_reference(student, teacher, beta, renormalize=renorm, tail_bucket=tail)
                errs[f"beta={beta} {'renormalized' if renorm else 'tail'}"] = _max_err(got, want)
        worst = max(errs.values())
        tol = ulps(torch.float32, logit_scale(torch.cat([student, teacher])), LOGPROB_ULPS)  # max |log p|
        assert worst <= tol, f"divergence error {worst:.2e} > {tol:.2e}: {errs}"
        detail = f"n={n} K={k}, beta 0/0.5/1, renormalized and tail bucket: max err {worst:.1e} (tol {tol:.1e})"
        return detail, {"max_err": worst, "tol": tol}

    return check


def checks(device: torch.device) -> dict[str, Callable[[], tuple[str, dict]]]:
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    out: dict[str, Callable[[], tuple[str, dict]]] = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        for c in cases:
            tag = f"n={c.n} V={c.v} K={c.k} T={c.temperature} {name}"
            out[f"kernels/token_logprobs {tag}"] = logprob_check(c, dtype, device)
            out[f"kernels/topk {tag}"] = topk_check(c, dtype, device)
    big = LogprobCase(2048, 151936, 64, 1.0) if device.type == "cuda" else LogprobCase(128, 4096, 64, 1.0)
    out[f"kernels/topk n={big.n} V={big.v} K={big.k} bfloat16"] = topk_check(big, torch.bfloat16, device)
    out["kernels/fused LM head"] = linear_check(device)
    out["kernels/fused LM head top-K scoring"] = linear_topk_check(device)
    out["kernels/support divergence"] = divergence_check(device)
    return out
