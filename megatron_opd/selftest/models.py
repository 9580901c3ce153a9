"""Tiny Qwen3 and Qwen3-MoE Megatron models on this device, with random weights shared with a
``transformers`` copy, for each layer spec that can run here (``local``; ``te`` where Transformer
Engine is installed):

- fp32 logits equal ``transformers``' (max |Δ| within 256 fp32 ulps of the largest |logit|: another
  implementation rounds each matmul, norm and softmax in another order);
- in the training dtype (bf16 on a GPU, fp32 on CPU), 3 sequences packed in one THD row (varlen flash
  attention where torch has it) give the logits of each sequence run alone, and forward + backward of
  a cross-entropy loss on the packed row gives the gradients of the fp32 model.

Those are judged in relative norm (per token for the logits, over all parameters for the gradients), in ulps of
the training dtype. fp32: 256 ulps for the logits, 512 for the gradients, as above. bf16: every activation is
rounded to bf16 (half an ulp each), a dozen times per layer, and the errors add up in norm: 8 bf16 ulps (6.3%)
for logits and gradients; MoE: 16 for the gradients, and logits judged on 95% of the tokens, since bf16 rounding
may flip a router's choice between near-tied experts. Measured on CPU in bf16: 1.5% and 1.6%.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_opd.selftest.report import Skip
from megatron_opd.selftest.tolerance import FORWARD_ULPS, forward_atol, ulps

BF16_ULPS = 8  # relative error of bf16 logits and gradients against fp32, in bf16 ulps


@dataclasses.dataclass(frozen=True)
class Tolerance:
    logits: float  # per-token relative norm of the logit error
    token_share: float  # share of tokens that must be within ``logits``
    grads: float  # relative norm of the gradient error over all parameters


BF16 = {
    "dense": Tolerance(ulps(torch.bfloat16, 1.0, BF16_ULPS), 1.0, ulps(torch.bfloat16, 1.0, BF16_ULPS)),
    "moe": Tolerance(ulps(torch.bfloat16, 1.0, BF16_ULPS), 0.95, ulps(torch.bfloat16, 1.0, 2 * BF16_ULPS)),
}
FP32 = Tolerance(ulps(torch.float32, 1.0, FORWARD_ULPS), 1.0, ulps(torch.float32, 1.0, 2 * FORWARD_ULPS))


def tiny_hf_config(kind: str) -> Any:
    """Qwen3's head dim (128) and GQA (4 query heads on 2 key/value heads), a few layers."""
    from megatron_opd.models.tiny import tiny_config

    shape = dict(vocab_size=512, hidden_size=256, head_dim=128, num_attention_heads=4, num_key_value_heads=2)
    if kind == "moe":
        return tiny_config(moe=True, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, **shape)
    return tiny_config(intermediate_size=384, **shape)


def _token_rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token: ||a - b|| / ||b|| over the vocabulary."""
    a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)


def _judge(what: str, got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> float:
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite logits"
    err = _token_rel_err(got, want)
    judged = float(torch.quantile(err, tol.token_share)) if tol.token_share < 1 else float(err.max())
    assert judged <= tol.logits, (
        f"{what}: token relative error {judged:.2e} > {tol.logits:.2e} (share {tol.token_share})"
    )
    return judged


class TinyModels:
    """The HF model saved once per kind; Megatron models built from it on demand."""

    def __init__(self, device: torch.device, root: Path) -> None:
        self.device, self.root = device, root
        self.hf: dict[str, torch.nn.Module] = {}

    def hf_dir(self, kind: str) -> Path:
        from megatron_opd.models.tiny import save_tiny_model

        path = self.root / kind
        if kind not in self.hf:
            self.hf[kind] = save_tiny_model(path, tiny_hf_config(kind), seed=1, init_std=0.05)
        return path

    def megatron(self, kind: str, spec: str, dtype: torch.dtype) -> torch.nn.Module:
        from megatron_opd.convert.hf_io import load_hf_config
        from megatron_opd.convert.load import load_hf_weights
        from megatron_opd.models.qwen3 import build_gpt_model

        path = self.hf_dir(kind)
        model = build_gpt_model(load_hf_config(path), spec=spec, params_dtype=dtype).to(self.device)
        load_hf_weights(model, path)
        return model

    def batch(self, lengths: list[int]) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """``(ids [1, T], packed model inputs, cu_seqlens)`` of random sequences of ``lengths``."""
        from megatron.core.packed_seq_params import PackedSeqParams

        ids = torch.randint(0, 512, (1, sum(lengths)), generator=torch.Generator().manual_seed(4)).to(self.device)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=self.device)
        pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(self.device)
        longest = max(lengths)
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )
        return ids, {"input_ids": ids, "position_ids": pos, "packed_seq_params": params}, cu


def _unpacked_logits(model: torch.nn.Module, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    from megatron_opd.models.forward import model_forward

    return torch.cat([model_forward(model, {"input_ids": ids[:, a:b]}) for a, b in itertools.pairwise(cu.tolist())], 1)


def _loss(logits: torch.Tensor, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy inside each sequence (float32)."""
    labels = ids[0].roll(-1).clone()
    labels[cu[1:].long() - 1] = -100  # the last token of a sequence predicts nothing
    return torch.nn.functional.cross_entropy(logits[0].float(), labels, ignore_index=-100, reduction="sum")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def matches_transformers(models: TinyModels, kind: str, spec: str) -> Callable[[], tuple[str, dict]]:
    def check() -> tuple[str, dict[str, Any]]:
        path = models.hf_dir(kind)
        hf = models.hf[kind].to(models.device)
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5)).to(models.device)
        with torch.no_grad():
            want = hf(ids).logits
            from megatron_opd.models.forward import model_forward

            got = model_forward(models.megatron(kind, spec, torch.float32).eval(), {"input_ids": ids})
        models.hf[kind] = hf.cpu()
        err, tol = float((got.double() - want.double()).abs().max()), forward_atol(want)
        assert err <= tol, f"max |megatron - transformers| = {err:.2e} > {tol:.2e} ({path.name})"
        return f"fp32 logits, max |Δ| {err:.1e} (tol {tol:.1e})", {"max_abs_err": err, "tol": tol}

    return check


def packed_train_step(models: TinyModels, kind: str, spec: str, dtype: torch.dtype) -> Callable[[], tuple[str, dict]]:
    lengths = [37, 5, 90] if models.device.type == "cuda" else [13, 2, 21]
    tol = BF16[kind] if dtype == torch.bfloat16 else FP32

    def check() -> tuple[str, dict[str, Any]]:
        from megatron_opd.models.forward import model_forward
        from megatron_opd.platform import compat

        ids, packed, cu = models.batch(lengths)
        ref_model = models.megatron(kind, spec, torch.float32)
        ref_logits = _unpacked_logits(ref_model, ids, cu)
        _loss(ref_logits, ids, cu).backward()
        ref_grads = _grads(ref_model)
        del ref_model
        model = models.megatron(kind, spec, dtype)
        with torch.no_grad():
            unpacked = _unpacked_logits(model.eval(), ids, cu)
        logits = model_forward(model.train(), packed)
        packed_err = _judge("packed vs unpacked", logits.detach(), unpacked, tol)
        ref_err = _judge(f"{str(dtype)[6:]} vs fp32", logits.detach(), ref_logits.detach(), tol)
        _loss(logits, ids, cu).backward()
        grads = _grads(model)
        assert grads.keys() == ref_grads.keys(), f"parameters with gradients differ: {grads.keys() ^ ref_grads.keys()}"
        assert all(bool(torch.isfinite(g).all()) for g in grads.values()), "non-finite gradients"
        diff = sum(float((grads[n] - ref_grads[n]).square().sum()) for n in grads) ** 0.5
        norm = sum(float(g.square().sum()) for g in ref_grads.values()) ** 0.5
        grad_err = diff / norm
        assert grad_err <= tol.grads, f"gradient relative error {grad_err:.2e} > {tol.grads:.2e}"
        varlen = compat.VARLEN_ATTENTION
        path = (
            "varlen_attn"
            if varlen is not None and varlen.supports(torch.empty(1, 1, 128, dtype=dtype, device=models.device), 0.0)
            else "per-sequence SDPA"
        )
        detail = (
            f"{str(dtype)[6:]}, {len(lengths)} sequences packed ({path}): vs unpacked {packed_err:.1e}, "
            f"vs fp32 {ref_err:.1e} (tol {tol.logits:.1e}), gradients {grad_err:.1e} (tol {tol.grads:.1e})"
        )
        return detail, {
            "attention": path,
            "packed_err": packed_err,
            "fp32_err": ref_err,
            "grad_rel_err": grad_err,
            **dataclasses.asdict(tol),
        }

    return check


def checks(models: TinyModels) -> dict[str, Callable[[], tuple[str, dict]]]:
    from megatron_opd.models.qwen3 import has_transformer_engine

    device = models.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = ["local", "te"] if device.type == "cuda" and has_transformer_engine() else ["local"]
    out: dict[str, Callable[[], tuple[str, dict]]] = {}
    for spec in specs:
        for kind in ("dense", "moe"):
            name = f"models/{'qwen3' if kind == 'dense' else 'qwen3_moe'} {spec}"
            out[f"{name}: logits = transformers"] = matches_transformers(models, kind, spec)
            out[f"{name}: packed fwd+bwd"] = packed_train_step(models, kind, spec, dtype)
    if specs == ["local"]:

        def no_te() -> tuple[str, dict]:
            reason = "no CUDA" if device.type != "cuda" else "Transformer Engine is not installed"
            raise Skip(f"te layer spec: {reason}")

        out["models/te spec"] = no_te
    return out
