"""RMSNorm for the layer spec used without Transformer Engine.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism; this one supports it the way
TE's and Apex's norms do: under sequence parallelism each rank normalizes its own sequence chunk,
and the weight is tagged ``sequence_parallel`` so ``finalize_model_grads`` all-reduces its
gradient over the TP group. Same parameter name (``weight``) and checkpoint keys. The ``Fused``
variants run the normalization as one compiled kernel (:mod:`megatron_opd.models.fusion`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from torch import Tensor

from megatron_opd.models.fusion import fused_rms_norm


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class QKRMSNorm(torch.nn.RMSNorm):
    """Per-head q/k RMSNorm: runs on gathered sequences, so never sequence-parallel."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


class _CompiledForward:
    weight: torch.nn.Parameter
    eps: float

    def forward(self, x: Tensor) -> Tensor:
        return fused_rms_norm(x, self.weight, self.eps)


class FusedRMSNorm(_CompiledForward, RMSNorm):
    """:class:`RMSNorm` as one compiled kernel."""


class FusedQKRMSNorm(_CompiledForward, QKRMSNorm):
    """:class:`QKRMSNorm` as one compiled kernel."""
