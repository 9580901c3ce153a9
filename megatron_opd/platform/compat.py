"""What differs between the builds and versions of torch and megatron-core this package supports,
bridged in one place and on every device (the redirections only a machine without CUDA needs are in
:mod:`megatron_opd.platform.cpu_compat`, which :func:`activate` switches on there).

1. ``torch.nn.attention.varlen.varlen_attn`` (variable-length flash attention, CUDA only) is absent
   before torch 2.10 and its keywords changed in every release since (read from each release's
   ``torch/nn/attention/varlen.py``):

   ====================  ====================================  =========  ==============
   torch                 causal mask                           ``scale``  ``enable_gqa``
   ====================  ====================================  =========  ==============
   2.8 – 2.9             (no ``varlen_attn``)
   2.10                  ``is_causal=True``                    no         no
   2.11                  ``window_size=(-1, 0)`` (keyword)     yes        no
   2.12 – 2.15           ``window_size=(-1, 0)`` (keyword)     yes        yes
   ====================  ====================================  =========  ==============

   :class:`VarlenAttention` calls the installed one with what its signature accepts: the query is
   pre-scaled where ``scale`` is missing (the kernel's own scale is ``1/sqrt(head_dim)``), K/V heads
   are repeated to the query heads where ``enable_gqa`` is missing. Without ``varlen_attn``, or for
   inputs the flash kernel does not take, attention runs one SDPA block per sequence
   (:mod:`megatron_opd.models.attention`).
2. megatron-core's MoE router (``transformer/moe/moe_utils.py``, 0.16) reads the module global
   ``te_general_gemm``, which is bound only when Transformer Engine imports: without it every MoE
   forward raises ``NameError`` on any device. :func:`bind_moe_router_gemm` binds it to ``None``
   (megatron's own "no TE" value: the router then uses ``torch.mm``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from megatron_opd.platform import cpu_compat

log = logging.getLogger(__name__)

# head dims the flash kernel behind varlen_attn takes (FlashAttention-2: up to 256)
FLASH_MAX_HEAD_DIM = 256
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class VarlenAttention:
    """Causal variable-length attention through one ``varlen_attn`` signature.

    ``causal``: the keyword that makes the mask causal; ``has_scale`` / ``has_gqa``: whether the
    signature takes ``scale`` / ``enable_gqa``.
    """

    fn: Callable[..., Tensor]
    causal: Literal["window_size", "is_causal"]
    has_scale: bool
    has_gqa: bool

    @classmethod
    def of(cls, fn: Callable[..., Tensor]) -> VarlenAttention:
        """Read ``fn``'s keywords; ``TypeError`` for a signature with neither causal keyword."""
        params = inspect.signature(fn).parameters
        if "window_size" in params:
            causal: Literal["window_size", "is_causal"] = "window_size"
        elif "is_causal" in params:
            causal = "is_causal"
        else:
            raise TypeError(f"varlen_attn{inspect.signature(fn)} takes neither window_size nor is_causal")
        return cls(fn, causal, "scale" in params, "enable_gqa" in params)

    def describe(self) -> str:
        """One line for reports: how this signature is called."""
        causal = "window_size=(-1, 0)" if self.causal == "window_size" else "is_causal=True"
        scale = "scale=" if self.has_scale else "query pre-scaled"
        gqa = "enable_gqa" if self.has_gqa else "K/V heads repeated for GQA"
        return f"{causal}, {scale}, {gqa}"

    @staticmethod
    def supports(query: Tensor, dropout: float) -> bool:
        """Whether the flash kernel takes these inputs: CUDA, fp16/bf16, head dim <= 256, no dropout."""
        return (
            query.is_cuda and query.dtype in FLASH_DTYPES and query.shape[-1] <= FLASH_MAX_HEAD_DIM and dropout == 0.0
        )

    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_kv: Tensor,
        max_seqlen_q: int,
        max_seqlen_kv: int,
        scale: float | None = None,
    ) -> Tensor:
        """Causal attention of every sequence of a packed batch: ``query`` [T, Hq, D], ``key`` /
        ``value`` [T, Hkv, D] with ``Hq % Hkv == 0`` (GQA), int32 sequence boundaries ``cu_seqlens_*``
        [S + 1] -> [T, Hq, D]. ``scale`` defaults to ``1/sqrt(D)``."""
        kwargs: dict[str, object] = {}
        if self.causal == "window_size":
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
        if scale is not None:
            if self.has_scale:
                kwargs["scale"] = scale
            else:
                factor = scale * math.sqrt(query.shape[-1])
                if not math.isclose(factor, 1.0, rel_tol=1e-12):
                    query = query * factor
        heads_q, heads_kv = query.shape[1], key.shape[1]
        if heads_q % heads_kv:
            raise ValueError(f"{heads_q} query heads are not a multiple of {heads_kv} key/value heads")
        if heads_q != heads_kv:
            if self.has_gqa:
                kwargs["enable_gqa"] = True
            else:  # query head h reads key/value head h // (Hq / Hkv), as with enable_gqa
                key, value = (t.repeat_interleave(heads_q // heads_kv, dim=1) for t in (key, value))
        return self.fn(query, key, value, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, **kwargs)


def installed_varlen_attention() -> VarlenAttention | None:
    """The installed torch's ``varlen_attn`` behind :class:`VarlenAttention`; ``None`` where torch has
    none (< 2.10) or one whose signature is not known (then a warning: attention runs per sequence)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    try:
        return VarlenAttention.of(varlen_attn)
    except TypeError as e:
        log.warning("%s (torch %s); packed attention runs one SDPA call per sequence", e, torch.__version__)
        return None


VARLEN_ATTENTION = installed_varlen_attention()


def bind_moe_router_gemm() -> None:
    """``moe_utils.te_general_gemm = None`` where megatron-core could not import it from TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def activate() -> bool:
    """Bridge the version differences for this process (every device), and switch the CPU
    compatibility layer on where CUDA is absent. Idempotent; True when the CPU layer is active."""
    bind_moe_router_gemm()
    return cpu_compat.activate()
