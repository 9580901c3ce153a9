"""Checks of the ops' arguments, before any pass over the logits: a wrong dtype raises ``TypeError``, a wrong shape
or value ``ValueError``; each message names the argument, what it got and the fix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_temperature(temperature: float) -> float:
    """``1 / temperature``; raises unless ``temperature`` is a finite number > 0."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number > 0; pass the rollout temperature.")
    return 1.0 / float(temperature)


def check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)}: must be [N, V_local] with V_local > 0; flatten to [tokens, vocab]."
        )
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits of dtype {logits.dtype}: unsupported; pass bf16, fp16 or fp32 logits.")


def check_index(name: str, t: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    """``t`` must be int64 of ``shape`` on ``like``'s device (token ids)."""
    fix = f"pass {name} as global token ids, e.g. {name}.long().to({like.device})."
    if t.dtype != torch.int64:
        raise TypeError(f"{name} of dtype {t.dtype}: must be int64; {fix}")
    if tuple(t.shape) != shape or t.device != like.device:
        raise ValueError(f"{name} of shape {tuple(t.shape)} on {t.device}: must be {shape} on {like.device}; {fix}")


def check_ids(ids: Tensor | None, n: int, like: Tensor) -> None:
    """``ids`` (optional) must be ``[n, K]`` int64 on ``like``'s device."""
    if ids is None:
        return
    if ids.dim() != 2:
        raise ValueError(f"ids of shape {tuple(ids.shape)}: must be [N, K]; pass one row of K global ids per token.")
    check_index("ids", ids, (n, ids.shape[1]), like)


def check_k(k: int, v_global: int) -> None:
    if not (isinstance(k, int) and 1 <= k <= v_global):
        raise ValueError(f"k={k!r}: must be an int in [1, {v_global}] (the vocabulary size); lower k.")


def check_linear(
    hidden: Tensor, weight: Tensor, labels: Tensor, ids: Tensor | None, temperature: float, chunk_tokens: int | None
) -> float:
    """The fused LM head's arguments: ``hidden [N, H]`` and ``weight [V_local, H]`` of one floating dtype, labels and
    ids as token ids, a chunk size; returns ``1 / temperature``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"hidden/weight of shapes {tuple(hidden.shape)} / {tuple(weight.shape)}: must be [N, H] and [V_local, H]; "
            "pass the output layer's input rows and this rank's weight shard."
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"hidden/weight of dtypes {hidden.dtype} / {weight.dtype}: must share one of bf16/fp16/fp32; cast one."
        )
    check_index("labels", labels, (hidden.shape[0],), hidden)
    check_ids(ids, hidden.shape[0], hidden)
    check_chunk("chunk_tokens", chunk_tokens)
    return check_temperature(temperature)


def check_chunk(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}: must be an int >= 1; omit it for the default.")
