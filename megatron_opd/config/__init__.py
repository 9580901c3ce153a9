"""Typed run configuration: YAML + ``key=value`` overrides, validated before anything starts."""

from megatron_opd.config.errors import ConfigError
from megatron_opd.config.loader import load_config, to_yaml
from megatron_opd.config.schema import ModelConfig, OPDConfig, ParallelConfig, TeacherConfig

__all__ = ["ConfigError", "ModelConfig", "OPDConfig", "ParallelConfig", "TeacherConfig", "load_config", "to_yaml"]
