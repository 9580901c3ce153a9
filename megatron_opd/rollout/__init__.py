"""Rollouts: the engine protocol, the ``hf`` / ``sglang`` / ``vllm`` engines and ``opd serve``.

Names are resolved lazily: the run-config schema imports :mod:`megatron_opd.rollout.config`,
which must not pull in torch or transformers.
"""

from __future__ import annotations

from megatron_opd.lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = sorted(_LAZY)
