"""Core attention on PyTorch's ``scaled_dot_product_attention`` for the layer spec used without
Transformer Engine.

megatron-core's local ``DotProductAttention`` materializes the [b, heads, s, s] score matrix in
the activation dtype. On Hopper, SDPA dispatches to flash / cuDNN / memory-efficient kernels that
never do; on CPU it is PyTorch's fused CPU kernel. GQA is native (``enable_gqa``), so keys and
values are not repeated. Packed sequences (``PackedSeqParams`` with ``qkv_format="thd"``) run as
one variable-length flash-attention call where torch has ``varlen_attn`` and the flash kernel takes
the inputs (CUDA, bf16/fp16; called through :class:`megatron_opd.platform.compat.VarlenAttention`,
which bridges its signatures across torch versions), and as one causal SDPA block per sequence
otherwise.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from megatron_opd.platform import compat


class SDPAttention(DotProductAttention):
    """Drop-in replacement for ``DotProductAttention`` (same constructor, same checkpoint keys)."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """``query`` [sq, b, np, hn], ``key``/``value`` [sk, b, ng, hn] -> context [sq, b, np*hn].

        ``attention_mask`` follows megatron's convention: True where attention is *not* allowed.
        With ``attn_mask_type=causal`` and no mask, the causal mask is applied by SDPA itself.
        """
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.attention_dropout.p if self.training else 0.0
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, packed_seq_params, dropout)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal = mask_type == AttnMaskType.causal and attention_mask is None
        sdpa_mask = None if attention_mask is None else ~attention_mask
        if sdpa_mask is not None and mask_type == AttnMaskType.causal:
            sq, sk = q.shape[2], k.shape[2]
            causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            sdpa_mask = sdpa_mask & causal
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=sdpa_mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        # [b, np, sq, hn] -> [sq, b, np*hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.shape[0], context.shape[1], self.hidden_size_per_partition)

    def _forward_packed(
        self, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams, dropout: float
    ) -> Tensor:
        """THD layout: ``query`` [t, 1, np, hn] (or [t, np, hn]); one causal block per sequence.
        Where PyTorch's variable-length flash attention takes the inputs, all sequences run in one
        kernel (every token must then belong to a sequence of ``cu_seqlens``)."""
        squeeze = query.dim() == 3
        varlen = compat.VARLEN_ATTENTION
        if varlen is not None and varlen.supports(query, dropout):
            q, k, v = (t if squeeze else t.squeeze(1) for t in (query, key, value))
            out = varlen(
                q,
                k,
                v,
                params.cu_seqlens_q,
                params.cu_seqlens_kv,
                int(params.max_seqlen_q),
                int(params.max_seqlen_kv),
                scale=self.softmax_scale,
            )
            out = out.reshape(out.shape[0], self.hidden_size_per_partition)
            return out if squeeze else out.unsqueeze(1)
        if squeeze:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        bounds = params.cu_seqlens_q.tolist()
        outs = []
        for start, end in itertools.pairwise(bounds):
            if end <= start:
                continue
            q, k, v = (t[start:end].permute(1, 2, 0, 3) for t in (query, key, value))
            o = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout,
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            outs.append(o.permute(2, 0, 1, 3))
        total = query.shape[0]
        context = torch.cat(outs, dim=0) if outs else query.new_zeros(0, *query.shape[1:])
        if context.shape[0] < total:  # padding tokens after the last sequence
            pad = context.new_zeros(total - context.shape[0], *context.shape[1:])
            context = torch.cat([context, pad], dim=0)
        context = context.reshape(total, 1, self.hidden_size_per_partition)
        return context.squeeze(1) if squeeze else context
