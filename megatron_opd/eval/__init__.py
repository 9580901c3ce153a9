"""Evaluation: avg@n / pass@k of sampled answers, scored by ``megatron_opd.rewards`` (``opd eval``,
and the trainer's periodic evaluation through ``evaluate``).

Names are resolved lazily: the run-config schema imports :mod:`megatron_opd.eval.config`, which
must not pull in torch, transformers or the data pipeline.
"""

from __future__ import annotations

from megatron_opd.lazy import lazy_attributes

_LAZY = {
    "EvalConfig": "megatron_opd.eval.config",
    "PROMPT_TEMPLATES": "megatron_opd.eval.templates",
    "apply_template": "megatron_opd.eval.templates",
    "evaluate": "megatron_opd.eval.runner",
    "load_problems": "megatron_opd.eval.runner",
    "k_values": "megatron_opd.eval.metrics",
    "pass_at_k": "megatron_opd.eval.metrics",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = sorted(_LAZY)
