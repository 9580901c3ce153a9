"""Qwen3 and Qwen3-MoE as Megatron-Core ``GPTModel``s, built from a Hugging Face config.

Qwen3 is a pre-norm decoder: RMSNorm, GQA attention with per-head RMSNorm on q and k, RoPE,
SwiGLU MLP (or a softmax-routed mixture of SwiGLU experts without shared experts), no biases.
Each of these maps onto a TransformerConfig field; see :func:`transformer_config_from_hf`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_opd.models.attention import SDPAttention
from megatron_opd.models.experts import GroupedExperts
from megatron_opd.models.fusion import local_fusion_fields, resolve_fusion
from megatron_opd.models.norm import FusedQKRMSNorm, FusedRMSNorm, QKRMSNorm, RMSNorm

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")
SpecName = Literal["auto", "te", "local"]


class ModelConfigError(ValueError):
    """A Hugging Face config this builder cannot turn into a Megatron model."""


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    return getattr(hf_config, name, default)


def rope_theta(hf_config: Any) -> float:
    """RoPE base. transformers v5 keeps it in ``rope_parameters``; v4 in ``rope_theta``."""
    params = _get(hf_config, "rope_parameters") or {}
    if "rope_theta" in params:
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ModelConfigError(
                f"rope_parameters.rope_type={rope_type!r} is not supported; only 'default' RoPE "
                "(Qwen3's) is. Remove the rope scaling from config.json or use a base model."
            )
        return float(params["rope_theta"])
    theta = _get(hf_config, "rope_theta")
    if theta is None:
        raise ModelConfigError("config has neither rope_parameters.rope_theta nor rope_theta")
    return float(theta)


def num_experts(hf_config: Any) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    if _get(hf_config, "model_type") != "qwen3_moe":
        return 0
    return int(_get(hf_config, "num_experts", None) or _get(hf_config, "num_local_experts", 0))


def moe_layer_pattern(hf_config: Any) -> list[int]:
    """1 where layer ``i`` is an MoE layer, 0 where it is dense (Qwen3-MoE's sparse-step rule)."""
    n = int(hf_config.num_hidden_layers)
    if num_experts(hf_config) == 0:
        return [0] * n
    step = int(_get(hf_config, "decoder_sparse_step", 1) or 1)
    dense = set(_get(hf_config, "mlp_only_layers", None) or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(n)]


def head_dim(hf_config: Any) -> int:
    hd = _get(hf_config, "head_dim")
    return int(hd) if hd else hf_config.hidden_size // hf_config.num_attention_heads


def check_supported(hf_config: Any) -> None:
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"model_type={model_type!r} is not supported; megatron_opd builds "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models (Qwen3 dense and Qwen3-MoE)."
        )
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise ModelConfigError(f"hidden_act={hf_config.hidden_act!r}: Qwen3 uses 'silu'")
    if _get(hf_config, "attention_bias", False):
        raise ModelConfigError("attention_bias=True is not a Qwen3 layout")
    if _get(hf_config, "use_sliding_window", False):
        raise ModelConfigError("use_sliding_window=True is not supported")
    rope_theta(hf_config)


def transformer_config_from_hf(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    recompute_num_layers: int | None = None,
    moe_token_dispatcher_type: str | None = None,
    moe_grouped_gemm: bool = False,
    use_cpu_initialization: bool | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` of a Qwen3 / Qwen3-MoE HF config.

    Parallel sizes are read from megatron's ``parallel_state`` (which must be initialized).
    ``overrides`` are passed to ``TransformerConfig`` last (any of its fields).
    """
    check_supported(hf_config)
    cuda = torch.cuda.is_available()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    # megatron-core requires sequence parallelism for MoE layers under TP (sequence length must
    # then be a multiple of TP).
    sequence_parallel = sequence_parallel or (num_experts(hf_config) > 0 and tp > 1)
    pattern = moe_layer_pattern(hf_config)
    n_experts = num_experts(hf_config)
    fields: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=_get(hf_config, "intermediate_size") or hf_config.hidden_size * 4,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=_get(hf_config, "initializer_range", 0.02),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=(not cuda) if use_cpu_initialization is None else use_cpu_initialization,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        # full: every layer recomputed on its own (megatron needs a count; 1 per checkpointed chunk)
        recompute_num_layers=(recompute_num_layers or 1) if recompute_granularity == "full" else None,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    if n_experts:
        fields.update(
            num_moe_experts=n_experts,
            moe_router_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            # All-MoE as the int 1 (Megatron-LM's and Megatron-Bridge's setting): megatron then writes
            # layer-stacked checkpoint keys (`decoder.layers.…`); a list makes them per layer.
            moe_layer_freq=1 if all(pattern) else pattern,
            moe_router_score_function="softmax",
            # norm_topk_prob=True: softmax over the top-k logits == renormalized top-k probs.
            moe_router_pre_softmax=not bool(_get(hf_config, "norm_topk_prob", False)),
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
            moe_grouped_gemm=moe_grouped_gemm,
            moe_token_dispatcher_type=moe_token_dispatcher_type or ("alltoall" if cuda else "allgather"),
        )
    elif overrides.get("variable_seq_lengths"):
        # megatron checks a dense model's (unused) token dispatcher too: its default, allgather, refuses variable
        # sequence lengths (pipeline parallelism over micro-batches of varying length)
        fields["moe_token_dispatcher_type"] = "alltoall"
    fields.update(overrides)
    return TransformerConfig(**fields)


def transformer_engine_problem() -> str | None:
    """Why megatron-core cannot build its Transformer Engine spec here; ``None`` when it can.

    A broken install counts: ``transformer_engine`` is found but fails to import (a torch or CUDA
    version it was not built for, a missing library). megatron-core's modules then import without it
    (``HAVE_TE = False``) and its TE spec fails later with a ``NameError`` or ``ImportError``."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "Transformer Engine is not installed"
    from megatron.core.extensions import transformer_engine as mcore_te
    from megatron.core.models.gpt import gpt_layer_specs

    if mcore_te.HAVE_TE and gpt_layer_specs.HAVE_TE:
        return None
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # what the install's import raises (ImportError, OSError, RuntimeError, ...)
        return f"Transformer Engine is installed but does not import ({type(e).__name__}: {e})"
    return "Transformer Engine is installed but megatron-core failed to import it"


def has_transformer_engine() -> bool:
    return transformer_engine_problem() is None


def resolve_spec_name(spec: SpecName = "auto") -> Literal["te", "local"]:
    """``auto`` picks Transformer Engine where it is usable and CUDA is present, else local (with a
    warning when TE is installed but broken)."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return "local"
        if has_transformer_engine():
            return "te"
        if importlib.util.find_spec("transformer_engine") is not None:  # installed, but broken
            warnings.warn(
                f"spec=auto: {transformer_engine_problem()}; building the local spec (SDPA attention) instead.",
                stacklevel=2,
            )
        return "local"
    if spec == "te" and not has_transformer_engine():
        raise ModelConfigError(
            f"spec='te' needs a working Transformer Engine: {transformer_engine_problem()}. Fix: install the "
            "Transformer Engine build for this torch and CUDA (pip install megatron_opd[gpu]), or use "
            "spec='local' (SDPA attention) or 'auto'."
        )
    if spec not in ("te", "local"):
        raise ModelConfigError(f"spec={spec!r}: choose one of auto, te, local")
    return spec


def transformer_engine_options(hf_config: Any) -> dict[str, Any]:
    """``TransformerConfig`` fields the TE spec runs faster with: the experts of a layer as TE's grouped
    GEMM (``TEGroupedMLP``) instead of a Python loop over one linear pair per expert, TE's fused RoPE,
    the fused SwiGLU, and weight gradients accumulated by the GEMM into ``main_grad`` where the fused
    kernel of the output layer (megatron's own ``ColumnParallelLinear``: APEX's
    ``fused_weight_gradient_mlp_cuda``) is installed."""
    from megatron.core.tensor_parallel import layers

    return dict(
        moe_grouped_gemm=num_experts(hf_config) > 0,
        apply_rope_fusion=True,
        bias_activation_fusion=True,
        gradient_accumulation_fusion=layers._grad_accum_fusion_available,
    )


def layer_block_spec(
    config: TransformerConfig, spec: SpecName = "auto", fusion: bool = False
) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage.

    ``te``: megatron-core's Transformer Engine spec (fused layernorm-linear, TE attention).
    ``local``: megatron-core's local modules with :class:`SDPAttention` as core attention,
    sequence-parallel-capable RMSNorms (:mod:`megatron_opd.models.norm`; compiled kernels with ``fusion``)
    and, in MoE layers, :class:`~megatron_opd.models.experts.GroupedExperts` as the experts.
    """
    name = resolve_spec_name(spec)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=name == "te", normalization="RMSNorm")
    if name == "te":
        return block
    norm, qk_norm = (FusedRMSNorm, FusedQKRMSNorm) if fusion else (RMSNorm, QKRMSNorm)
    layer_specs = []
    for layer_spec in block.layer_specs:
        layer_spec = copy.deepcopy(layer_spec)
        layer_spec.submodules.input_layernorm = norm
        layer_spec.submodules.pre_mlp_layernorm = norm
        mlp = layer_spec.submodules.mlp
        if mlp.module is MoELayer:
            # The TE spec keeps an MoE layer's pre-MLP norm as `pre_mlp_layernorm` (no fused
            # layernorm-linear to fold it into); keep that checkpoint key instead of the local
            # spec's rename to `mlp.linear_fc1.layer_norm_weight`, so checkpoints load with either.
            keys_map = dict(layer_spec.submodules.sharded_state_dict_keys_map)
            keys_map.pop("pre_mlp_layernorm.", None)
            layer_spec.submodules.sharded_state_dict_keys_map = keys_map
            mlp.submodules = dataclasses.replace(mlp.submodules, experts=ModuleSpec(module=GroupedExperts))
        attn = layer_spec.submodules.self_attention
        attn.submodules = dataclasses.replace(
            attn.submodules, core_attention=SDPAttention, q_layernorm=qk_norm, k_layernorm=qk_norm
        )
        layer_specs.append(layer_spec)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=norm)


# TransformerConfig of a model that only scores: no activation recomputation, no router losses
FROZEN_CONFIG: dict[str, Any] = dict(
    recompute_granularity=None, recompute_method=None, recompute_num_layers=None, moe_z_loss_coeff=None
)


def build_gpt_model(
    hf_config: Any,
    *,
    spec: SpecName = "auto",
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    fusion: bool | None = None,
    frozen: bool = False,
    **config_options: Any,
) -> GPTModel:
    """This rank's part of a Qwen3 / Qwen3-MoE ``GPTModel`` under the current parallel state.

    With no options: fp32 parameters, the spec chosen by :func:`resolve_spec_name` (with TE, the
    settings of :func:`transformer_engine_options`), pre/post
    process from this rank's pipeline stage, vocab-parallel logits ([s, b, V/TP] -> GPTModel
    returns [b, s, V/TP]). ``fusion``: the local spec's compiled RMSNorm, RoPE and SwiGLU
    (:mod:`megatron_opd.models.fusion`; None: where CUDA is present). ``frozen``: a model that only
    scores (a teacher, a reference): built without what only training needs (activation recomputation,
    whose selective MoE / layernorm modules megatron runs even in eval mode; router auxiliary and z losses),
    in eval mode, without gradients. ``config_options`` go to :func:`transformer_config_from_hf`.
    """
    from megatron_opd.platform import compat

    compat.activate()
    name = resolve_spec_name(spec)
    local = name == "local"
    fused = local and resolve_fusion(fusion)
    fusion_fields = local_fusion_fields(fused) if local else {}
    te_fields = transformer_engine_options(hf_config) if name == "te" else {}
    inference_fields = FROZEN_CONFIG if frozen else {}
    config = transformer_config_from_hf(
        hf_config, **{**te_fields, **fusion_fields, **config_options, **inference_fields}
    )
    tp = config.tensor_model_parallel_size
    if hf_config.vocab_size % tp:
        raise ModelConfigError(f"vocab_size={hf_config.vocab_size} is not divisible by tensor_model_parallel_size={tp}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_block_spec(config, name, fused),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=bool(_get(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
    )
    if frozen:
        model.eval().requires_grad_(False)
    return model
