"""Model FLOPs of a Qwen3 / Qwen3-MoE forward pass, for tokens/s → MFU (docs/benchmarks.md).

Counted as everyone counts MFU (PaLM appendix B; Megatron-LM's ``num_floating_point_operations``): 2 FLOPs per
multiply-add of every matmul a token goes through — attention projections, the MLP (for MoE: the router and
the ``num_experts_per_tok`` experts the token is routed to), the LM head — plus causal attention, where query
``i`` of a sequence scores and mixes ``i + 1`` keys: ``QKᵀ`` and ``A·V`` cost ``2 · 2 · q_dim`` per (query, key)
pair and layer. Training is 3× the forward (backward = 2×); recomputation is not counted (it is hardware work,
not model work). Norms, RoPE, softmax and the embedding lookup are left out (< 1%).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_opd.models.qwen3 import head_dim, moe_layer_pattern, num_experts


def matmul_params_per_token(hf_config: Any) -> int:
    """Weights a token multiplies with in one forward pass (experts: only the routed ones)."""
    h = hf_config.hidden_size
    q = hf_config.num_attention_heads * head_dim(hf_config)
    kv = hf_config.num_key_value_heads * head_dim(hf_config)
    attention = h * q + 2 * h * kv + q * h
    total = 0
    for is_moe in moe_layer_pattern(hf_config):
        if is_moe:
            routed = hf_config.num_experts_per_tok * 3 * h * hf_config.moe_intermediate_size
            total += attention + routed + h * num_experts(hf_config)  # + router
        else:
            total += attention + 3 * h * hf_config.intermediate_size
    return total + h * hf_config.vocab_size  # LM head


def attention_flops(hf_config: Any, seq_lens: Sequence[int]) -> int:
    """Causal ``QKᵀ`` + ``A·V`` FLOPs of one forward pass over sequences of ``seq_lens`` tokens."""
    q = hf_config.num_attention_heads * head_dim(hf_config)
    pairs = sum(s * (s + 1) // 2 for s in seq_lens)  # (query, key) pairs with key <= query
    return hf_config.num_hidden_layers * 4 * q * pairs


def forward_flops(hf_config: Any, seq_lens: Sequence[int]) -> int:
    return 2 * matmul_params_per_token(hf_config) * sum(seq_lens) + attention_flops(hf_config, seq_lens)


def training_flops(hf_config: Any, seq_lens: Sequence[int]) -> int:
    """Forward + backward model FLOPs of one step over ``seq_lens`` (recomputation not counted)."""
    return 3 * forward_flops(hf_config, seq_lens)
