"""megatron_opd: on-policy distillation of LLMs on Megatron-Core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns on import when Transformer Engine / Apex are absent (every CPU run); the
# fallbacks it takes are the ones this project intends there.
_warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex|Apex) (are|is) not installed.*")
