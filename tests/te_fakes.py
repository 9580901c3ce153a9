"""Transformer Engine, faked for CPU tests: what megatron-core 0.16.1 and the project see of TE 2.9.

:func:`install` makes megatron-core's Transformer Engine spec buildable without TE: the classes its
spec provider and ``gpt_layer_specs`` name (``megatron/core/extensions/transformer_engine.py``) are
replaced by the fakes below, which keep the real classes' constructor signatures, their parameters
(names, shapes, TE's explicit ``device`` argument, TE's ``_extra_state``) and their sharded state
dicts; they have no forward. :func:`install_fused_adam` makes megatron's optimizer factory pick
:class:`FusedAdam` (``megatron/core/optimizer/__init__.py`` and ``distrib_optimizer.py`` choose TE's
FusedAdam whenever TE imports). Every function patches module attributes for the rest of the process:
call them inside a spawned test process (or undo them with pytest's ``monkeypatch`` there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy
from itertools import chain
from typing import Any, ClassVar

import torch

# ---- modules (transformer_engine/pytorch/module/*.py, megatron/core/extensions/transformer_engine.py)


def _te_device(config: Any) -> Any:
    """``_get_extra_te_kwargs``: TE modules get an explicit device (a default-device context does not apply)."""
    if config.use_cpu_initialization:
        return "cpu"
    if config.init_model_with_meta_device:
        return "meta"
    return torch.cuda.current_device()


class _TEModule(torch.nn.Module):
    """TE's ``TransformerEngineBaseModule``: FP8 metadata as ``_extra_state``, an empty uint8 tensor
    when FP8 is off (``base.py`` ``get_extra_state`` / ``set_extra_state``)."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        raise AssertionError("the fake Transformer Engine holds no FP8 state to load")

    def _new_param(self, name: str, shape: tuple[int, ...], config: Any, init_method: Callable | None) -> None:
        """``torch.empty(..., device=device)`` then ``reset_parameters(defer_init=device == "meta")``."""
        device = _te_device(config)
        param = torch.nn.Parameter(torch.empty(*shape, device=device, dtype=config.params_dtype))
        if device != "meta" and init_method is not None:
            init_method(param)
        self.register_parameter(name, param)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the fake {type(self).__name__} has no forward")


def _condition_init_method(config: Any, init_method: Callable) -> Callable:
    return init_method if config.perform_initialization else (lambda w: None)


def _tp_group(tp_group: Any, is_expert: bool) -> Any:
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    return get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)


class TELinear(_TEModule):
    """``TELinear`` (te.pytorch.Linear): ``weight`` [out/TP, in] (column) or [out, in/TP] (row); no
    ``bias`` parameter without bias. Its sharded state dict splits ``tp_axis_map`` over TP."""

    tp_axis_map: ClassVar[dict[str, int] | None] = None  # replicated (duplicated mode)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        parallel_mode: str | None,
        config: Any,
        init_method: Callable,
        bias: bool,
        skip_bias_add: bool,
        skip_weight_param_allocation: bool,
        tp_comm_buffer_name: str | None = None,
        is_expert: bool = False,
        symmetric_ar_type: str | None = None,
        tp_group: Any = None,
    ) -> None:
        from megatron.core.utils import get_pg_size

        super().__init__()
        if skip_weight_param_allocation:
            raise ValueError("Transformer Engine linear layers do not support skip_weight_param_allocation")
        self.config, self.parallel_mode = config, parallel_mode
        self._tp_group = None if parallel_mode == "duplicated" else _tp_group(tp_group, is_expert)
        tp_size = 1 if parallel_mode == "duplicated" else get_pg_size(self._tp_group)
        expert_parallel = config.expert_model_parallel_size > 1
        self._before_weight(input_size, config)
        if parallel_mode == "column":
            output_size //= tp_size
        elif parallel_mode == "row":
            input_size //= tp_size
        self.use_bias = bias
        self._new_param("weight", (output_size, input_size), config, _condition_init_method(config, init_method))
        if bias:
            self._new_param("bias", (output_size,), config, lambda w: torch.nn.init.zeros_(w))
        for param in self.parameters():
            param.allreduce = not expert_parallel if is_expert else True

    def _before_weight(self, input_size: int, config: Any) -> None:
        """Parameters TE registers before ``weight`` (none for a plain linear)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            self.tp_axis_map,
            sharded_offsets,
            tp_group=self._tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class TEColumnParallelLinear(TELinear):
    tp_axis_map: ClassVar[dict[str, int] | None] = {"weight": 0, "bias": 0}

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Callable,
        gather_output: bool,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        skip_weight_param_allocation: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: Any = None,
        stride: int = 1,
    ) -> None:
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        super().__init__(
            input_size,
            output_size,
            parallel_mode="column",
            config=config,
            init_method=init_method,
            bias=bias,
            skip_bias_add=skip_bias_add,
            skip_weight_param_allocation=skip_weight_param_allocation,
            tp_comm_buffer_name=tp_comm_buffer_name,
            is_expert=is_expert,
            tp_group=_tp_group(tp_group, is_expert),
        )


class TERowParallelLinear(TELinear):
    tp_axis_map: ClassVar[dict[str, int] | None] = {"weight": 1}

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Callable,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None = None,
        tp_group: Any = None,
    ) -> None:
        super().__init__(
            input_size,
            output_size,
            parallel_mode="row",
            config=config,
            init_method=init_method,
            bias=bias,
            skip_bias_add=skip_bias_add,
            skip_weight_param_allocation=False,
            tp_comm_buffer_name=tp_comm_buffer_name,
            is_expert=is_expert,
            tp_group=_tp_group(tp_group, is_expert),
        )


class TELayerNormColumnParallelLinear(TEColumnParallelLinear):
    """te.pytorch.LayerNormLinear: ``layer_norm_weight`` [in] first (RMSNorm: no ``layer_norm_bias``),
    then ``weight`` [out/TP, in]; the constructor is megatron's column-parallel one."""

    def _before_weight(self, input_size: int, config: Any) -> None:
        self._new_param("layer_norm_weight", (input_size,), config, lambda w: torch.nn.init.ones_(w))


class _RMSNorm(_TEModule):
    """te.pytorch.RMSNorm: ``weight`` [hidden]; an operation with ``_extra_state`` (ops/op.py)."""

    def __init__(self, config: Any, hidden_size: int) -> None:
        super().__init__()
        self._new_param("weight", (hidden_size,), config, lambda w: torch.nn.init.ones_(w))


class TENorm:
    """``TENorm.__new__`` returns TE's norm module itself (RMSNorm here)."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5) -> Any:
        if config.normalization != "RMSNorm":
            raise AssertionError("the fake Transformer Engine has RMSNorm only")
        return _RMSNorm(config, hidden_size)


class TEDotProductAttention(_TEModule):
    """TE attention: no parameters (no learnable softmax offset), only ``_extra_state``, which its
    sharded state dict leaves out."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        num_splits: int | None = None,
        cp_comm_type: str | None = "p2p",
        pg_collection: Any = None,
    ) -> None:
        super().__init__()
        self.config = config

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        return {}


class TEGroupedLinear(_TEModule):
    """te.pytorch.GroupedLinear: ``weight0`` ... ``weight{N-1}``, one per local expert; the sharded state
    dict names them like SequentialMLP's experts (``_sharded_state_dict_grouped``)."""

    def __init__(
        self,
        num_gemms: int,
        input_size: int,
        output_size: int,
        *,
        parallel_mode: str | None,
        config: Any,
        init_method: Callable,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.utils import get_pg_size

        super().__init__()
        assert is_expert, "TEGroupedLinear only supports expert parallelism"
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self._pg_collection, self._tp_group = pg_collection, pg_collection.expt_tp
        tp_size = get_pg_size(self._tp_group)
        if parallel_mode == "column":
            output_size //= tp_size
        elif parallel_mode == "row":
            input_size //= tp_size
        self.num_gemms, self.use_bias = num_gemms, bias
        for i in range(num_gemms):
            self._new_param(
                f"weight{i}", (output_size, input_size), config, _condition_init_method(config, init_method)
            )
        expert_parallel = config.expert_model_parallel_size > 1
        for param in self.parameters():
            param.allreduce = not expert_parallel

    def _sharded_state_dict_grouped(
        self, tp_axis_map: dict, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None
    ) -> dict:
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
        from megatron.core.utils import get_pg_rank, get_pg_size

        sharded_state_dict = {}
        full_state_dict = self.state_dict(prefix="", keep_vars=True)
        num_global_experts = get_pg_size(self._pg_collection.ep) * self.num_gemms
        local_expert_indices_offset = get_pg_rank(self._pg_collection.ep) * self.num_gemms
        ep_axis = len(sharded_offsets)
        extra_states = [full_state_dict["_extra_state"]] * self.num_gemms  # no FP8: the state is not split
        for gemm_idx in range(self.num_gemms):
            global_expert_idx = local_expert_indices_offset + gemm_idx
            state_dict = {
                f"{gemm_idx}.weight": full_state_dict[f"weight{gemm_idx}"],
                f"{gemm_idx}._extra_state": extra_states[gemm_idx],
            }
            new_sharded_offsets = (*sharded_offsets, (ep_axis, global_expert_idx, num_global_experts))
            sub_sd = make_sharded_tensors_for_checkpoint(
                state_dict,
                "",
                tp_axis_map,
                new_sharded_offsets,
                tp_group=self._tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
            replace_prefix_for_sharding(sub_sd, f"{gemm_idx}.", prefix)
            sharded_state_dict[f"{prefix}weight{gemm_idx}"] = sub_sd[f"{gemm_idx}.weight"]
            sharded_state_dict[f"{prefix}_extra_state{'' if gemm_idx == 0 else gemm_idx}"] = sub_sd[
                f"{gemm_idx}._extra_state"
            ]
        for sh_ten in sharded_state_dict.values():
            replica_id = sh_ten.replica_id
            sh_ten.replica_id = (*replica_id[:2], get_pg_rank(self._pg_collection.expt_dp))
        return sharded_state_dict


class _ParallelGroupedLinear(TEGroupedLinear):
    """The constructor megatron's column- and row-parallel grouped linears share."""

    parallel_mode = ""

    def __init__(
        self,
        num_gemms: int,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Callable,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(
            num_gemms,
            input_size,
            output_size,
            parallel_mode=self.parallel_mode,
            config=config,
            init_method=init_method,
            bias=bias,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_comm_buffer_name=tp_comm_buffer_name,
            pg_collection=pg_collection,
        )


class TEColumnParallelGroupedLinear(_ParallelGroupedLinear):
    parallel_mode = "column"

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        tp_axis_map = {}
        for gemm_idx in range(self.num_gemms):
            tp_axis_map.update({f"{gemm_idx}.weight": 0, f"{gemm_idx}.bias": 0})
        return self._sharded_state_dict_grouped(tp_axis_map, prefix, sharded_offsets, metadata)


class TERowParallelGroupedLinear(_ParallelGroupedLinear):
    parallel_mode = "row"

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        tp_axis_map = {f"{gemm_idx}.weight": 1 for gemm_idx in range(self.num_gemms)}
        return self._sharded_state_dict_grouped(tp_axis_map, prefix, sharded_offsets, metadata)


def _fused_rope_unavailable(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the fake Transformer Engine has no fused RoPE kernel")


def install(patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make megatron-core's TE spec and the project's TE checks see the fakes above (``patch(module,
    name, value)``: ``setattr`` in a spawned process, ``monkeypatch.setattr`` in this one)."""
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_opd.models import qwen3

    for cls in (
        TELinear,
        TEColumnParallelLinear,
        TERowParallelLinear,
        TELayerNormColumnParallelLinear,
        TENorm,
        TEDotProductAttention,
        TEColumnParallelGroupedLinear,
        TERowParallelGroupedLinear,
    ):
        patch(provider, cls.__name__, cls)
    patch(provider, "TEActivationOp", None)
    patch(provider, "is_te_min_version", lambda version, check_equality=True: True)
    patch(gpt_layer_specs, "TENorm", TENorm)
    patch(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider)
    patch(gpt_layer_specs, "HAVE_TE", True)
    # TransformerConfig checks that TE's fused RoPE exists when apply_rope_fusion is on
    patch(rope_utils, "fused_apply_rotary_pos_emb", _fused_rope_unavailable)
    patch(rope_utils, "fused_apply_rotary_pos_emb_thd", _fused_rope_unavailable)
    patch(qwen3, "transformer_engine_problem", lambda: None)


# ---- the optimizer (transformer_engine/pytorch/optimizers/fused_adam.py)


class FusedAdam(torch.optim.Optimizer):
    """TE 2.9's ``FusedAdam`` for fp32 states, its multi-tensor kernel in plain torch.

    What megatron and the project meet: the step lives in each param group (``group["step"]``), the
    per-parameter state holds only ``exp_avg``, ``exp_avg_sq`` (and ``master_param`` with
    ``master_weights``), and ``state_dict()`` maps every state key through ``name_to_dtype_map``
    (``get_unscaled_state``): any other key is a ``KeyError``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        bias_correction: bool = True,
        adam_w_mode: bool = True,
        capturable: bool = False,
        master_weights: bool = False,
        master_weight_dtype: torch.dtype = torch.float32,
        exp_avg_dtype: torch.dtype = torch.float32,
        exp_avg_sq_dtype: torch.dtype = torch.float32,
        use_decoupled_grad: bool = False,
        store_param_remainders: bool = False,
        set_grad_none: bool | None = None,
    ) -> None:
        if amsgrad or capturable or master_weights or store_param_remainders:
            raise AssertionError("the fake FusedAdam covers fp32 states without master weights")
        if {exp_avg_dtype, exp_avg_sq_dtype} != {torch.float32}:
            raise AssertionError("the fake FusedAdam covers fp32 states")
        defaults = {
            "lr": lr,
            "bias_correction": bias_correction,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.master_weights = master_weights
        self.store_param_remainders = False
        self.name_to_dtype_map = {
            "exp_avg": exp_avg_dtype,
            "exp_avg_sq": exp_avg_sq_dtype,
            "master_param": master_weight_dtype,
        }

    def get_unscaled_state(self, param: torch.Tensor, state_name: str) -> torch.Tensor:
        state = self.state[param]
        dtype = self.name_to_dtype_map[state_name]
        assert dtype == torch.float32 and state[state_name].dtype == torch.float32
        return state[state_name]

    def set_scaled_state(self, param: torch.Tensor, state_name: str, unscaled_state: torch.Tensor) -> None:
        assert unscaled_state.dtype == torch.float32
        state = self.state[param]
        if state_name not in state:
            self._initialize_state(param, state_name, False)
        state[state_name].copy_(unscaled_state)

    def _initialize_state(
        self, param: torch.Tensor, state_name: str, zero_buffer: bool, store_param_remainders: bool = False
    ) -> None:
        data = torch.empty_like(param, dtype=self.name_to_dtype_map[state_name])
        if zero_buffer:
            data.zero_()
        self.state[param][state_name] = data

    def initialize_state(self, param: torch.Tensor, store_param_remainders: bool) -> None:
        self._initialize_state(param, "exp_avg", zero_buffer=True)
        self._initialize_state(param, "exp_avg_sq", zero_buffer=True)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        saved_groups = deepcopy(state_dict["param_groups"])
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for k, v in state_dict["state"].items():
            if k in id_map:
                param = id_map[k]
                state_dict["state"][k] = {name: self.get_unscaled_state(param, name) for name in v}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_groups = deepcopy(state_dict["param_groups"])
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for k, v in state_dict["state"].items():
            if k in id_map:
                param = id_map[k]
                self.state[param] = {}
                for name in v:
                    if v[name] is not None:
                        self.set_scaled_state(param, name, v[name].float())

    @torch.no_grad()
    def step(self, closure: Callable | None = None, grad_scaler: Any = None) -> Any:
        """``multi_tensor_adam`` on fp32 tensors: one shared step per group, bias-corrected moments,
        decoupled weight decay in AdamW mode, L2 otherwise."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            bc1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            bc2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    self.initialize_state(p, False)
                if p.grad is None:
                    continue
                g = p.grad
                if not self.adam_w_mode and group["weight_decay"]:
                    g = g + group["weight_decay"] * p
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
                if self.adam_w_mode and group["weight_decay"]:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])
        return loss


def install_fused_adam(patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """megatron's optimizer factory and distributed optimizer as they are with TE installed."""
    from megatron.core import optimizer
    from megatron.core.optimizer import distrib_optimizer

    patch(optimizer, "Adam", FusedAdam)
    patch(optimizer, "USING_PYTORCH_OPTIMIZER", False)
    patch(distrib_optimizer, "Adam", FusedAdam)
    patch(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    patch(distrib_optimizer, "USING_TE_OPTIMIZER", True)
