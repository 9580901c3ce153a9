"""The version bridges of ``platform/compat.py``, on CPU: ``varlen_attn`` called through every
released signature (fakes with the real signatures, ``varlen_fakes``) equals per-sequence SDPA in
values and gradients, also inside a Megatron model's packed forward; and megatron-core's MoE router
gets ``te_general_gemm`` on a build with CUDA but without Transformer Engine."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_opd.platform import compat
from megatron_opd.platform.compat import VarlenAttention
from tests.tolerance import forward_atol, ulps
from tests.unit import varlen_fakes
from tests.unit.varlen_fakes import BY_RELEASE

LENGTHS = [5, 1, 9, 3]  # a one-token sequence too
# float64 attention through another path (pre-scaled query, repeated K/V heads, einsums instead of SDPA's matmuls):
# each of its reductions (over at most 9 keys or 8 channels) and the softmax round in another order, a few ulps
# of the largest |entry| each, forward and backward
ATTENTION_ULPS = 64


def test_each_release_signature_is_read() -> None:
    got = {release: VarlenAttention.of(fn) for release, fn in BY_RELEASE.items()}
    assert [(a.causal, a.has_scale, a.has_gqa) for a in got.values()] == [
        ("is_causal", False, False),
        ("window_size", True, False),
        ("window_size", True, True),
    ]
    with pytest.raises(TypeError, match="neither window_size nor is_causal"):
        VarlenAttention.of(lambda q, k, v, cu_q, cu_k, max_q, max_k: q)


def test_installed_torch_is_bridged() -> None:
    """torch >= 2.10 has ``varlen_attn``: this environment's is read (2.12+ signature: GQA native)."""
    from torch.nn.attention import varlen

    installed = compat.installed_varlen_attention()
    assert installed is not None and installed.fn is varlen.varlen_attn
    assert installed == VarlenAttention.of(varlen.varlen_attn)


def test_unknown_signature_falls_back_to_sdpa(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", lambda query, key, value, cu_q, cu_k, max_q, max_k, mask=None: query)
    with caplog.at_level(logging.WARNING):
        assert compat.installed_varlen_attention() is None
    assert "per sequence" in caplog.text


def test_flash_inputs_only() -> None:
    """The flash kernel is CUDA-only: CPU tensors always take the per-sequence SDPA path."""
    q = torch.zeros(4, 2, 16, dtype=torch.bfloat16)
    assert not VarlenAttention.supports(q, 0.0)


def _packed(heads_q: int, heads_kv: int, dim: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(heads_q * 10 + heads_kv)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, dim, generator=g, dtype=torch.float64) for h in (heads_q, heads_kv, heads_kv))
    cu = torch.tensor([0, *itertools.accumulate(LENGTHS)], dtype=torch.int32)
    return q, k, v, cu


def _per_sequence_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None):
    outs = []
    for a, b in itertools.pairwise(cu.tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [h, s, d]
        o = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=qs.shape[0] != ks.shape[0]
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("release", list(BY_RELEASE))
@pytest.mark.parametrize(("heads_q", "heads_kv"), [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("scale", [None, 0.25])
def test_adapter_equals_per_sequence_sdpa(release: str, heads_q: int, heads_kv: int, scale: float | None) -> None:
    """Causal mask, scale (pre-scaled query on 2.10) and GQA (repeated K/V before 2.12): values and
    gradients of q, k, v equal per-sequence SDPA in float64."""
    attention = VarlenAttention.of(BY_RELEASE[release])
    q, k, v, cu = _packed(heads_q, heads_kv)
    longest = max(LENGTHS)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, cu, cu, longest, longest, scale=scale)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _per_sequence_sdpa(*ref_inputs, cu, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=ulps(torch.float64, ref.detach().abs().max(), ATTENTION_ULPS))
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=ulps(torch.float64, want.abs().max(), ATTENTION_ULPS))


def test_query_heads_must_group_key_heads() -> None:
    q, k, v, cu = _packed(3, 2)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        VarlenAttention.of(varlen_fakes.varlen_attn_2_12)(q, k, v, cu, cu, 9, 9)


class _VarlenOnCpu(VarlenAttention):
    """Takes CPU tensors, so the model's flash branch runs here with a fake behind it."""

    @staticmethod
    def supports(query: torch.Tensor, dropout: float) -> bool:
        return dropout == 0.0


def _model_logits(releases: list[str]) -> dict[str, torch.Tensor]:
    """A tiny GQA Qwen3 as a Megatron model: logits of 3 sequences packed in one THD row through each
    release's ``varlen_attn`` and through per-sequence SDPA, and of each sequence alone (unpacked)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_opd.models.forward import model_forward
    from megatron_opd.models.qwen3 import build_gpt_model
    from megatron_opd.models.tiny import tiny_config
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes())
    torch.manual_seed(0)
    model = build_gpt_model(tiny_config(num_attention_heads=4, num_key_value_heads=2)).eval()
    lengths = [7, 2, 11]
    ids = torch.randint(0, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths)
    )
    packed = {"input_ids": ids, "position_ids": pos, "packed_seq_params": params}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for release in releases:
            compat.VARLEN_ATTENTION = _VarlenOnCpu.of(BY_RELEASE[release])
            before = varlen_fakes.CALLS[release.split("-")[0]]
            out[release] = model_forward(model, packed)[0]
            assert varlen_fakes.CALLS[release.split("-")[0]] > before, f"{release}: the varlen branch did not run"
        compat.VARLEN_ATTENTION = None
        out["per_sequence"] = model_forward(model, packed)[0]
        out["unpacked"] = torch.cat(
            [model_forward(model, {"input_ids": ids[:, a:b]})[0] for a, b in itertools.pairwise(cu.tolist())]
        )
    return out


@pytest.mark.slow
def test_packed_model_forward_through_each_release() -> None:
    from megatron_opd.platform.spawn import spawn_world

    (logits,) = spawn_world(_model_logits, 1, list(BY_RELEASE))
    atol = forward_atol(logits["unpacked"])  # the same model's forward through another attention path
    for name in [*BY_RELEASE, "per_sequence"]:
        torch.testing.assert_close(logits[name], logits["unpacked"], rtol=0, atol=atol, msg=name)


def test_moe_router_gets_te_general_gemm_where_cuda_exists() -> None:
    """A CUDA build without Transformer Engine (CUDA faked present, so the CPU layer stays off): after
    ``compat.activate`` megatron's router gating runs, on torch.mm, instead of raising NameError."""
    code = """
import torch
torch.cuda.is_available = lambda: True
from megatron_opd.platform import compat, cpu_compat
from megatron.core.transformer.moe import moe_utils
assert not compat.activate() and not cpu_compat.is_active()
assert moe_utils.te_general_gemm is None
g = torch.Generator().manual_seed(0)
inp = torch.randn(5, 8, generator=g, requires_grad=True)
weight = torch.randn(4, 8, generator=g, requires_grad=True)
out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
assert torch.equal(out, inp @ weight.T)  # the same torch.mm
out.sum().backward()
# torch.mm(onesᵀ, inp) against inp.sum(0): 5 terms summed in another order, 4 roundings at the size of their sum
tol = 4 * torch.finfo(torch.float32).eps * float(inp.detach().abs().sum(0).max())
assert (weight.grad - inp.detach().sum(0)).abs().max() <= tol
"""
    try:
        import transformer_engine  # noqa: F401

        pytest.skip("Transformer Engine is installed: megatron binds te_general_gemm itself")
    except ImportError:
        pass
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
