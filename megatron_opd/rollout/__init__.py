"""Rollouts: the engine protocol, the ``hf`` / ``sglang`` / ``vllm`` engines and ``opd serve``.

Names are resolved lazily: the run-config schema imports :mod:`megatron_opd.rollout.config`,
which must not pull in torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SamplingParams": "megatron_opd.rollout.base",
    "Completion": "megatron_opd.rollout.base",
    "RolloutEngine": "megatron_opd.rollout.base",
    "RolloutError": "megatron_opd.rollout.base",
    "RolloutConfig": "megatron_opd.rollout.config",
    "build_engine": "megatron_opd.rollout.factory",
    "HFEngine": "megatron_opd.rollout.hf_engine",
    "SGLangEngine": "megatron_opd.rollout.sglang.client",
    "VLLMEngine": "megatron_opd.rollout.vllm_engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
