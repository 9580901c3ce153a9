"""``build_engine``: the rollout engine a run config asks for."""

from __future__ import annotations

from typing import Any

from megatron_opd.rollout.base import RolloutEngine
from megatron_opd.rollout.config import RolloutConfig


def build_engine(cfg: RolloutConfig, model_dir: str, *, tokenizer: Any = None) -> RolloutEngine:
    """The ``cfg.engine`` engine serving the model in ``model_dir`` (an HF directory).

    ``tokenizer``: when given, its EOS id ends generations besides the model's own EOS ids
    (``generation_config.json`` / ``config.json``)."""
    cfg.validate()
    eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    if cfg.engine == "hf":
        from megatron_opd.rollout.hf_engine import HFEngine

        return HFEngine(
            model_dir, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, eos_token_ids=eos
        )
    if cfg.engine == "sglang":
        from megatron_opd.rollout.sglang.client import SGLangEngine

        return SGLangEngine(cfg, model_dir, eos_token_ids=eos)
    from megatron_opd.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, model_dir, eos_token_ids=eos)
