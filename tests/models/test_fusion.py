"""The local spec's fused (compiled) RMSNorm, RoPE and SwiGLU: each kernel against megatron's unfused path /
transformers in float64, and the whole model with ``fusion`` on and off equal to transformers (logits, packed
sequences included) and to each other (gradients). torch.compile builds C++ kernels on a CPU: shapes are tiny."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_opd.models import fusion
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from tests.tolerance import FORWARD_ULPS, forward_atol, ulps

ONE_RANK = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # megatron's unfused THD RoPE asks a CP group


def _freqs(positions: int, dim: int) -> torch.Tensor:
    """megatron's RotaryEmbedding angles: [positions, 1, 1, dim], halves repeated (rotate-half layout)."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :].float()


def rope_atol(t: torch.Tensor) -> float:
    """fp32 RoPE against float64: cos and sin (an ulp each), two products and their sum (a rounding each), at the
    magnitude |t| (|cos| + |sin|) ≤ 2 max |t|: 4 ulps of it."""
    return ulps(torch.float32, 2 * t.detach().abs().max(), 4)


def test_sequence_positions() -> None:
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # an empty sequence in the middle; 2 tokens of padding
    assert fusion.sequence_positions(cu, 9).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]


def test_fused_rope_thd_equals_megatron() -> None:
    """Positions restart at every sequence (megatron's unfused THD path when max_seqlen < tokens), forward and
    backward, against megatron's unfused implementation in float64."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    cu = torch.tensor([0, 5, 5, 12, 16], dtype=torch.int32)
    freqs = _freqs(8, 16)
    t = torch.randn(16, 3, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ours = fusion.fused_rope_thd(t, cu, freqs)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    (g_ours,) = torch.autograd.grad(ours, t, grad)
    t64 = t.detach().double().requires_grad_()
    ref = _apply_rotary_pos_emb_thd(t64, cu, freqs.double(), cp_group=ONE_RANK)
    (g_ref,) = torch.autograd.grad(ref, t64, grad.double())
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=0, atol=rope_atol(t))
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=0, atol=rope_atol(grad))  # the inverse rotation
    with pytest.raises(ValueError, match="context parallelism"):
        fusion.fused_rope_thd(t, cu, freqs, cp_size=2)


def test_fused_rope_sbhd_equals_megatron() -> None:
    """Partial rotary dimension included (the last channels pass through)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    freqs = _freqs(12, 8)  # longer than the sequence: megatron's hook slices it
    t = torch.randn(7, 2, 3, 16, generator=torch.Generator().manual_seed(2))
    ref = _apply_rotary_pos_emb_bshd(t.double(), freqs[:7].double())
    torch.testing.assert_close(fusion.fused_rope_sbhd(t, freqs).double(), ref, rtol=0, atol=rope_atol(t))
    with pytest.raises(ValueError, match="rotary_interleaved"):
        fusion.fused_rope_sbhd(t, freqs, interleaved=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_transformers(dtype: torch.dtype) -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    g = torch.Generator().manual_seed(3)
    hf = Qwen3RMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(32, generator=g))
    x = torch.randn(5, 2, 32, generator=g).to(dtype)
    ours = fusion.fused_rms_norm(x, hf.weight, 1e-6)
    assert ours.dtype == dtype
    # relative to each entry: the compiled mean of squares and rsqrt round in another order, a few fp32 ulps of the
    # normalized value (8); in bf16 that value is rounded and then scaled, and either rounding may land one step
    # away: 2 bf16 ulps, 3 with margin
    rtol = ulps(torch.float32, 1.0, 8) + (ulps(dtype, 1.0, 3) if dtype != torch.float32 else 0.0)
    torch.testing.assert_close(ours, hf(x), rtol=rtol, atol=0)


def test_resolve_fusion(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fusion.resolve_fusion(True) and not fusion.resolve_fusion(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not fusion.resolve_fusion(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fusion.resolve_fusion(None)


# ---- the whole model ----

SEQ_LENS = [5, 7, 4]


def _packed(ids: torch.Tensor) -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(SEQ_LENS).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in SEQ_LENS]).unsqueeze(0)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(SEQ_LENS), max_seqlen_kv=max(SEQ_LENS)
    )
    return {"input_ids": ids, "position_ids": positions, "packed_seq_params": params}


def _model_run(path: str, ids: torch.Tensor, packed_ids: torch.Tensor) -> dict:
    """Per fusion setting: the model's modules, logits (padded batch and packed) and gradients."""
    from megatron_opd.convert.hf_io import load_hf_config
    from megatron_opd.convert.load import load_hf_weights
    from megatron_opd.models.forward import model_forward
    from megatron_opd.models.qwen3 import build_gpt_model
    from megatron_opd.platform.distributed import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes())
    out = {}
    for fused in (False, True):
        model = build_gpt_model(load_hf_config(path), fusion=fused)
        load_hf_weights(model, path)
        layer = model.decoder.layers[0]
        modules = {
            "norm": type(layer.input_layernorm).__name__,
            "qk_norm": type(layer.self_attention.q_layernorm).__name__,
            "final_norm": type(model.decoder.final_layernorm).__name__,
            "apply_rope_fusion": model.config.apply_rope_fusion,
            "bias_activation_fusion": model.config.bias_activation_fusion,
        }
        logits = model_forward(model, {"input_ids": ids})
        packed = model_forward(model, _packed(packed_ids))
        (logits.float().pow(2).mean() + packed.float().pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[fused] = {"modules": modules, "logits": logits.detach(), "packed": packed.detach(), "grads": grads}
    return out


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, torch.Tensor, list[torch.Tensor]]:
    path = tmp_path_factory.mktemp("fusion") / "dense"
    hf = save_tiny_model(path, tiny_config(num_hidden_layers=2), seed=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    packed_ids = torch.randint(0, 128, (1, sum(SEQ_LENS)), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits
        per_seq = [hf(part).logits[0] for part in packed_ids.split(SEQ_LENS, dim=1)]
    (result,) = spawn_world(_model_run, 1, str(path), ids, packed_ids)
    return result, ref, per_seq


@pytest.mark.slow
def test_fusion_switch_selects_the_kernels(model_runs: tuple) -> None:
    runs, _, _ = model_runs
    assert runs[True]["modules"] == {
        "norm": "FusedRMSNorm",
        "qk_norm": "FusedQKRMSNorm",
        "final_norm": "FusedRMSNorm",
        "apply_rope_fusion": True,
        "bias_activation_fusion": True,
    }
    assert runs[False]["modules"] == {
        "norm": "RMSNorm",
        "qk_norm": "QKRMSNorm",
        "final_norm": "RMSNorm",
        "apply_rope_fusion": False,
        "bias_activation_fusion": False,
    }


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_local_spec_equals_transformers(model_runs: tuple, fused: bool) -> None:
    """Padded batch and packed sequences (RoPE and attention restart at each sequence) alike."""
    runs, ref, per_seq = model_runs
    torch.testing.assert_close(runs[fused]["logits"], ref, rtol=0, atol=forward_atol(ref))
    packed_ref = torch.cat(per_seq)
    torch.testing.assert_close(runs[fused]["packed"][0], packed_ref, rtol=0, atol=forward_atol(packed_ref))


@pytest.mark.slow
def test_fused_gradients_equal_unfused(model_runs: tuple) -> None:
    runs, _, _ = model_runs
    fused, unfused = runs[True]["grads"], runs[False]["grads"]
    assert fused.keys() == unfused.keys()
    for name, g in unfused.items():
        assert g.abs().max() > 0, name
        # a forward and a backward pass through other kernels: 2 × FORWARD_ULPS of the largest |entry|
        atol = ulps(torch.float32, g.abs().max(), 2 * FORWARD_ULPS)
        torch.testing.assert_close(fused[name], g, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
