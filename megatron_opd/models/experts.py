"""The routed experts of an MoE layer as grouped GEMMs, for the layer spec used without Transformer Engine.

megatron-core's local spec runs the experts one after another (``SequentialMLP``: per expert a split, two
GEMMs and the activation, and a host sync for the token counts); its ``GroupedMLP`` needs the ``grouped_gemm``
package and bf16. :class:`GroupedExperts` keeps every local expert's weights in one tensor per projection and
runs each projection as one grouped GEMM over all local experts: PyTorch's ``grouped_mm`` (CUTLASS on Hopper,
bf16), or, where that does not apply (CPU, fp32, unaligned shapes), a loop over the experts with the same
arithmetic as ``SequentialMLP``.

Layout (this rank's ``E`` local experts, expert-tensor-parallel width ``t``, hidden size ``h``, expert FFN
size ``f``): ``linear_fc1.weight`` is ``[E, 2f/t, h]`` (expert ``e``'s ``[gate_r; up_r]``, exactly
``SequentialMLP``'s ``local_experts.e.linear_fc1.weight``), ``linear_fc2.weight`` is ``[E, h, f/t]``. Expert
``e`` of a stacked parameter is what Transformer Engine's ``TEGroupedMLP`` calls ``linear_fcN.weight<e>``.
The sharded state dict writes per-expert tensors under ``SequentialMLP``'s keys and chunking, so
``torch_dist`` checkpoints (model and optimizer) load into either module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

GroupedMM = Callable[..., Tensor]  # torch.nn.functional.grouped_mm(mat_a, mat_b, *, offs, bias, out_dtype)


def grouped_mm_kernel(
    device: torch.device, dtype: torch.dtype, in_features: int, out_features: int
) -> GroupedMM | None:
    """PyTorch's grouped GEMM where it applies to ``[T, in] @ [E, in, out]`` in ``dtype`` on ``device``, else None.

    It takes bf16 on CUDA with rows aligned to 16 bytes (``in`` and ``out`` multiples of 8).
    ``torch.nn.functional.grouped_mm`` (torch >= 2.10) runs CUTLASS on sm90 / sm100 and loops over groups on
    other GPUs; torch 2.8 and 2.9 only have ``torch._grouped_mm`` (same arguments), Hopper-only in 2.8.
    """
    if device.type != "cuda" or dtype != torch.bfloat16 or in_features % 8 or out_features % 8:
        return None
    kernel = getattr(F, "grouped_mm", None)
    if kernel is not None:
        return kernel
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] == 9:
        return torch._grouped_mm
    return None


def grouped_linear(x: Tensor, weight: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """``x`` [T, in] (rows grouped by expert, ``tokens_per_expert`` [E] rows each) times each group's
    ``weight[e]`` [out, in] transposed: [T, out]."""
    kernel = grouped_mm_kernel(x.device, x.dtype, weight.shape[2], weight.shape[1])
    if kernel is not None and x.shape[0] > 0:
        offs = torch.cumsum(tokens_per_expert, 0).to(device=x.device, dtype=torch.int32)
        return kernel(x, weight.transpose(1, 2), offs=offs)
    # the loop: SequentialMLP's arithmetic (megatron's linear is matmul(x, w.t())); empty groups keep their
    # weights in the graph, so every expert has a gradient
    parts = torch.split(x, tokens_per_expert.tolist())
    return torch.cat([torch.matmul(part, w.t()) for part, w in zip(parts, weight.unbind(0))])


class ExpertWeights(torch.nn.Module):
    """One projection of all local experts: ``weight`` [experts, out, in], split over expert-TP on ``tp_dim``."""

    def __init__(
        self, experts: int, out_features: int, in_features: int, config: TransformerConfig, init: Callable, tp_dim: int
    ) -> None:
        super().__init__()
        # megatron's convention: no device on CPU initialization, so a `with torch.device("meta")` applies
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(experts, out_features, in_features, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization and not config.use_cpu_initialization:
            # megatron's GPU init: under the expert-parallel RNG stream, so EP ranks draw different experts
            _initialize_affine_weight_gpu(self.weight, init, partition_dim=tp_dim, is_expert=True)
        else:
            set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=tp_dim, stride=1)
            if config.perform_initialization:
                with torch.no_grad():
                    init(self.weight)
        # as megatron's expert linears: gradients reduced over the expert-data-parallel group under EP
        self.weight.allreduce = config.expert_model_parallel_size == 1


class GroupedExperts(MegatronModule):
    """Drop-in for ``SequentialMLP`` (constructor, forward, checkpoint keys) with SwiGLU experts as grouped GEMMs."""

    def __init__(
        self, num_local_experts: int, config: TransformerConfig, submodules: Any = None, pg_collection: Any = None
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "gated_linear_unit": (config.gated_linear_unit, True),
            "activation_func": (config.activation_func, F.silu),
            "add_bias_linear": (config.add_bias_linear, False),
            "moe_apply_probs_on_input": (config.moe_apply_probs_on_input, False),
            "moe_latent_size": (config.moe_latent_size, None),
            "fp8": (config.fp8, None),
            "fp4": (config.fp4, None),
        }
        for field, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ValueError(
                    f"GroupedExperts runs SwiGLU experts without bias in bf16/fp32: TransformerConfig.{field}={value!r} "
                    f"needs megatron's SequentialMLP or TEGroupedMLP (set {field}={wanted!r} to use this module)."
                )
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        ffn = divide(config.moe_ffn_hidden_size, self.tp_group.size())
        h = config.hidden_size
        self.linear_fc1 = ExpertWeights(num_local_experts, 2 * ffn, h, config, config.init_method, tp_dim=1)
        self.linear_fc2 = ExpertWeights(num_local_experts, h, ffn, config, config.output_layer_init_method, tp_dim=2)

    def forward(
        self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor
    ) -> tuple[Tensor, None]:
        """``SequentialMLP.forward``: tokens grouped by local expert -> this rank's partial expert outputs
        (the token dispatcher reduces them over expert-TP and combines them)."""
        x = permuted_local_hidden_states
        fc1 = grouped_linear(x, self.linear_fc1.weight, tokens_per_expert)
        probs = permuted_probs.unsqueeze(-1)
        if self.config.bias_activation_fusion:
            act = weighted_bias_swiglu_impl(fc1, None, probs, self.config.activation_func_fp8_input_store)
        else:
            gate, up = torch.chunk(fc1, 2, dim=-1)
            act = (F.silu(gate) * up * probs).to(fc1.dtype)
        return grouped_linear(act, self.linear_fc2.weight, tokens_per_expert), None

    def backward_dw(self) -> None:
        """Weight gradients are computed in the backward pass itself (no delayed wgrad)."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, ShardedTensorFactory]:
        """``SequentialMLP``'s checkpoint tensors: ``{prefix}experts.linear_fcN.weight`` per global expert
        (a prepended expert axis), ``linear_fc1`` split into gate and up halves over expert-TP."""
        if (metadata or {}).get("singleton_local_shards", False):
            raise ValueError(
                "GroupedExperts writes the stacked-experts checkpoint layout; "
                "metadata['singleton_local_shards']=True is not supported (leave it unset)."
            )
        layout = _ExpertShards(
            prefix_axes=len(sharded_offsets),
            offsets=tuple(sharded_offsets),
            first_expert=self.ep_group.rank() * self.num_local_experts,
            experts=self.ep_group.size() * self.num_local_experts,
            tp_rank=self.tp_group.rank(),
            tp_size=self.tp_group.size(),
        )
        replica_id = (0, 0, self.dp_group.rank())
        return {
            f"{prefix}{name}.weight": ShardedTensorFactory(
                f"{prefix}experts.{name}.weight", module.weight, build, merge, replica_id
            )
            for name, module, build, merge in (
                ("linear_fc1", self.linear_fc1, layout.build_fc1, _merge_fc1),
                ("linear_fc2", self.linear_fc2, layout.build_fc2, _merge_fc2),
            )
        }


@dataclasses.dataclass(frozen=True)
class _ExpertShards:
    """Where this rank's stacked expert weights sit in the global (layer, expert, out, in) checkpoint tensors."""

    prefix_axes: int  # axes prepended above this module (the layer axis of layer-stacked keys)
    offsets: tuple  # their sharded offsets
    first_expert: int  # global index of this rank's first local expert
    experts: int  # global number of experts
    tp_rank: int
    tp_size: int

    def _tensor(self, key: str, data: Tensor, e: int, tp: tuple[int, int, int], replica_id: Any) -> ShardedTensor:
        expert = (self.prefix_axes, self.first_expert + e, self.experts)
        return ShardedTensor.from_rank_offsets(
            key, data, *self.offsets, expert, tp, replica_id=replica_id, prepend_axis_num=self.prefix_axes + 1
        )

    @staticmethod
    def _check_flat(flattened_range: slice | None) -> None:
        if flattened_range is not None:
            raise ValueError(
                "GroupedExperts checkpoints need unflattened tensors (distrib_optim_sharding_type='fully_reshardable')"
            )

    def build_fc1(
        self, key: str, t: Tensor, replica_id: Any, flattened_range: slice | None
    ) -> list[list[ShardedTensor]]:
        """Per expert: its gate half at TP chunk ``r`` of ``2t`` and its up half at chunk ``t + r`` (megatron's
        ``apply_swiglu_sharded_factory``)."""
        self._check_flat(flattened_range)
        axis = self.prefix_axes + 1
        out = []
        for e, w in enumerate(t.unbind(0)):
            gate, up = torch.chunk(w, 2, dim=0)
            out.append(
                [
                    self._tensor(key, gate, e, (axis, self.tp_rank, 2 * self.tp_size), replica_id),
                    self._tensor(key, up, e, (axis, self.tp_size + self.tp_rank, 2 * self.tp_size), replica_id),
                ]
            )
        return out

    def build_fc2(self, key: str, t: Tensor, replica_id: Any, flattened_range: slice | None) -> list[ShardedTensor]:
        """Per expert: ``[h, f/t]``, TP chunk ``r`` of the input dimension."""
        self._check_flat(flattened_range)
        tp = (self.prefix_axes + 2, self.tp_rank, self.tp_size)
        return [self._tensor(key, w, e, tp, replica_id) for e, w in enumerate(t.unbind(0))]


def _merge_fc1(loaded: list[list[Tensor]]) -> Tensor:
    return torch.stack([torch.cat(halves, dim=0) for halves in loaded])


def _merge_fc2(loaded: list[Tensor]) -> Tensor:
    return torch.stack(loaded)
