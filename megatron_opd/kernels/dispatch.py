"""Which implementation runs the vocab-sized passes (DESIGN "kernels/"): the Triton kernels on CUDA tensors, the
chunked torch path elsewhere; ``OPD_KERNELS=torch|triton`` forces one (Triton on CPU needs ``TRITON_INTERPRET=1``
set before Triton is imported; the kernel tests do so).

A backend is a module with two functions over one rank's shard, both reading the logits once:
``row_stats(logits, labels_local, ids_local, inv_temp, topk) -> (LocalStats, topk_x | None, topk_col | None)`` and
``grad_logits(logits, labels_local, ids_local, row_vals, g_ids, inv_temp) -> dlogits``.
"""

from __future__ import annotations

import os
from types import ModuleType

from torch import Tensor

from megatron_opd.config.errors import ConfigError

BACKENDS = ("torch", "triton")


def backend_name(logits: Tensor) -> str:
    """``OPD_KERNELS`` if set, else ``triton`` for CUDA tensors and ``torch`` otherwise."""
    forced = os.environ.get("OPD_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ConfigError("OPD_KERNELS", forced, "unknown kernel backend.", f"use one of {', '.join(BACKENDS)}.")
        return forced
    return "triton" if logits.is_cuda else "torch"


def backend_for(logits: Tensor) -> ModuleType:
    """The backend module for ``logits`` (imported lazily: Triton is only loaded when used)."""
    name = backend_name(logits)
    if name == "torch":
        from megatron_opd.kernels import torch_backend

        return torch_backend
    if not logits.is_cuda:
        import triton

        if not triton.knobs.runtime.interpret:
            raise ConfigError(
                "OPD_KERNELS",
                "triton",
                "Triton kernels need CUDA tensors; these logits are on the CPU.",
                "set TRITON_INTERPRET=1 before starting Python (tests), or OPD_KERNELS=torch.",
            )
    from megatron_opd.kernels import triton_backend

    return triton_backend
