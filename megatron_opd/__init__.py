"""megatron_opd: on-policy distillation of LLMs on Megatron-Core."""

__version__ = "0.1.0"
