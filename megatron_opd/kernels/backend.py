"""The contract between the ops and the two implementations of their vocab-sized passes, and the choice of one:
the Triton kernels (``triton_backend``) on CUDA tensors, the chunked torch path (``torch_backend``) elsewhere;
``OPD_KERNELS=torch|triton`` forces one (Triton on CPU needs ``TRITON_INTERPRET=1`` set before Triton is imported;
the tests do so).

Both passes work on one tensor-parallel rank's shard ``logits [N, V_local]``, with ``x = logits · inv_temp``; labels
and ids arrive as columns of that shard (``-1``: another rank owns the id, or it is ignored).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Protocol, runtime_checkable

from torch import Tensor

BACKENDS = ("torch", "triton")


class LocalStats(NamedTuple):
    """One rank's per-row summary of its shard; all fp32."""

    z_max: Tensor  # [N] max of the logits z over the shard (-inf when the whole shard row is -inf)
    sum_exp: Tensor  # [N] Σ exp(x - m), m = z_max · inv_temp
    sum_exp_shift: Tensor  # [N] Σ exp(x - m)·(x - m)
    label_x: Tensor  # [N] x at the label when this rank owns it, else 0
    ids_x: Tensor | None  # [N, K] x at the ids this rank owns, else 0


@runtime_checkable
class VocabBackend(Protocol):
    """The two passes every op is built from (a module satisfies it: ``torch_backend``, ``triton_backend``)."""

    def row_stats(
        self, logits: Tensor, labels_local: Tensor, ids_local: Tensor | None, inv_temp: float, topk: int
    ) -> tuple[LocalStats, Tensor | None, Tensor | None]:
        """One read of the shard: the row statistics, ``x`` at the labels and ids, and with ``topk > 0`` the
        shard's ``topk`` largest ``x`` and their columns ``[N, topk]`` (fp32, int64), descending, ties to the lower
        column, padded with ``-inf`` / ``-1`` when the shard has fewer than ``topk`` columns."""
        ...

    def grad_logits(
        self,
        logits: Tensor,
        labels_local: Tensor,
        ids_local: Tensor | None,
        row_vals: Tensor,
        g_ids: Tensor | None,
        inv_temp: float,
        out: Tensor | None = None,
    ) -> Tensor:
        """``d loss / d logits`` in the logits' dtype (one read, one write), written into ``out`` (which may be
        ``logits`` itself) or a new tensor. ``row_vals [N, 6]`` = (max, log-sum, H, G, g_H, g_label) with ``G`` the
        sum of the label and ids upstream gradients, ``g_ids [N, K]`` (masked entries already zero). Per element,
        with ``log p = (x - max·inv_temp) - log-sum``:
        ``dz_j = inv_temp · [p_j·(-G - g_H·(log p_j + H)) + g_label·1[j = y] + Σ_k g_k·1[j = id_k]]``."""
        ...


def backend_name(logits: Tensor) -> str:
    """``OPD_KERNELS`` if set, else ``triton`` for CUDA tensors and ``torch`` otherwise."""
    forced = os.environ.get("OPD_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"OPD_KERNELS={forced!r}: unknown kernel backend; use one of {', '.join(BACKENDS)}.")
        return forced
    return "triton" if logits.is_cuda else "torch"


def backend_for(logits: Tensor) -> VocabBackend:
    """The backend for ``logits`` (imported lazily: Triton is only loaded when used)."""
    if backend_name(logits) == "torch":
        from megatron_opd.kernels import torch_backend

        return torch_backend
    if not logits.is_cuda:
        import triton

        if not triton.knobs.runtime.interpret:
            raise ValueError(
                "OPD_KERNELS=triton: the Triton kernels need CUDA tensors and these logits are on the CPU; set "
                "TRITON_INTERPRET=1 before starting Python (tests), or OPD_KERNELS=torch."
            )
    from megatron_opd.kernels import triton_backend

    return triton_backend
