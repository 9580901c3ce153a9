"""Evaluation: avg@n / pass@k of sampled answers, scored by ``megatron_opd.rewards`` (``opd eval``,
and the trainer's periodic evaluation through ``evaluate``).

Names are resolved lazily: the run-config schema imports :mod:`megatron_opd.eval.config`, which
must not pull in torch, transformers or the data pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EvalConfig": "megatron_opd.eval.config",
    "PROMPT_TEMPLATES": "megatron_opd.eval.templates",
    "apply_template": "megatron_opd.eval.templates",
    "evaluate": "megatron_opd.eval.runner",
    "load_problems": "megatron_opd.eval.runner",
    "k_values": "megatron_opd.eval.metrics",
    "pass_at_k": "megatron_opd.eval.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
