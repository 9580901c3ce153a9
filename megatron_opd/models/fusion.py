"""Fused elementwise work for the layer spec used without Transformer Engine: what TE's spec fuses, here as
``torch.compile`` kernels (Triton on a GPU).

- RMSNorm (input, pre-MLP, final) and the per-head q/k RMSNorm: one kernel forward, one backward
  (:func:`fused_rms_norm`, transformers' arithmetic: normalize in fp32, round, then scale).
- RoPE of q and k: one kernel each way, for ``sbhd`` and for packed ``thd`` sequences (positions restart at
  every ``cu_seqlens`` boundary, as in TE's fused RoPE), through megatron's own hook: ``apply_rope_fusion``
  calls ``rope_utils.fused_apply_rotary_pos_emb[_thd]``, which are TE's functions where TE is installed and
  :func:`fused_rope_sbhd` / :func:`fused_rope_thd` otherwise (:func:`install_rope_fusion`).
- SwiGLU (dense MLP and the experts, with the router's weights for the experts): megatron's
  ``bias_activation_fusion`` kernels (``megatron.core.fusions.fused_bias_swiglu``, also ``torch.compile``).

:func:`local_fusion_fields` are the ``TransformerConfig`` fields that switch them on; the norm classes are
chosen in the layer spec (:func:`megatron_opd.models.qwen3.layer_block_spec`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' Qwen3 RMSNorm: ``weight * (x / sqrt(mean(x²) + eps))``, the normalization in fp32 and
    rounded to ``x``'s dtype before the scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(t: Tensor, freqs: Tensor) -> Tensor:
    """Rotate-half RoPE of ``t`` [..., d] by the angles ``freqs`` [..., r] (fp32, broadcast to ``t``; r ≤ d, the
    last ``d - r`` channels pass through), as megatron's unfused path and transformers compute it: cos and sin
    rounded to ``t``'s dtype, ``t · cos + rotate_half(t) · sin``."""
    r = freqs.shape[-1]
    rot, rest = t[..., :r], t[..., r:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


# dynamic shapes from the first call: token counts change with every micro-batch, and one compiled graph per
# tensor rank and grad mode stays within dynamo's recompile limit (the norms share one code object)
fused_rms_norm = torch.compile(rms_norm, dynamic=True)
_fused_rope = torch.compile(rope, dynamic=True)


def fused_rope_sbhd(
    t: Tensor, freqs: Tensor, transpose_output_memory: bool = False, interleaved: bool = False
) -> Tensor:
    """megatron's ``fused_apply_rotary_pos_emb`` hook: ``t`` [s, b, h, d], ``freqs`` [≥ s, 1, 1, r]."""
    if interleaved:
        raise ValueError("rotary_interleaved=True: the local spec's fused RoPE rotates halves (Qwen3's RoPE)")
    return _fused_rope(t, freqs[: t.shape[0]])


def sequence_positions(cu_seqlens: Tensor, tokens: int) -> Tensor:
    """Position of every packed token in its own sequence ([tokens], int64): ``i - cu_seqlens[j]`` for the
    sequence ``j`` holding token ``i`` (tokens after the last boundary count from it)."""
    idx = torch.arange(tokens, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True).clamp_(max=cu_seqlens.numel() - 1)
    return idx - cu_seqlens.long()[seq]


def fused_rope_thd(t: Tensor, cu_seqlens: Tensor, freqs: Tensor, cp_size: int = 1, cp_rank: int = 0) -> Tensor:
    """megatron's ``fused_apply_rotary_pos_emb_thd`` hook: ``t`` [T, h, d] packed sequences, ``freqs``
    [max_seqlen, 1, 1, r]; each sequence's positions start at 0."""
    if cp_size != 1:
        raise ValueError(f"context parallelism (cp_size={cp_size}) is not supported by the local spec's fused RoPE")
    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1])[sequence_positions(cu_seqlens.to(t.device), t.shape[0])]
    return _fused_rope(t, angles.unsqueeze(1))


def install_rope_fusion() -> None:
    """Give megatron's RoPE-fusion hooks an implementation where Transformer Engine did not (idempotent);
    ``TransformerConfig(apply_rope_fusion=True)`` checks for them when it is built."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope_sbhd
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = fused_rope_thd


def resolve_fusion(fusion: bool | None) -> bool:
    """``None`` (auto): fused where CUDA is present (compiled kernels pay off on a GPU; on a CPU the compile
    costs more than it saves)."""
    return torch.cuda.is_available() if fusion is None else fusion


def local_fusion_fields(fusion: bool) -> dict[str, bool]:
    """The ``TransformerConfig`` fields of the local spec's fused RoPE and SwiGLU (installs the RoPE hooks
    when on)."""
    if fusion:
        install_rope_fusion()
    return {"apply_rope_fusion": fusion, "bias_activation_fusion": fusion}
