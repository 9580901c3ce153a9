"""Typed run configuration: YAML + ``key=value`` overrides, validated before anything starts.

The schema imports each subsystem's section (``data/config.py``, ``rollout/config.py``, ...), and
those import :mod:`megatron_opd.config.errors`; the names below are therefore resolved lazily so
importing a subsystem first does not make a circular import.
"""

from __future__ import annotations

from megatron_opd.config.errors import ConfigError
from megatron_opd.lazy import lazy_attributes

_LAZY = {
    "load_config": "megatron_opd.config.loader",
    "to_yaml": "megatron_opd.config.loader",
    "ModelConfig": "megatron_opd.config.schema",
    "OPDConfig": "megatron_opd.config.schema",
    "ParallelConfig": "megatron_opd.config.schema",
    "TeacherConfig": "megatron_opd.config.schema",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = ["ConfigError", "ModelConfig", "OPDConfig", "ParallelConfig", "TeacherConfig", "load_config", "to_yaml"]
