"""``rollout:`` section of the run config: which engine serves the student's samples, how."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import ConfigError, check_choice, check_positive


@dataclasses.dataclass
class SGLangConfig:
    urls: list[str] = dataclasses.field(default_factory=list)  # attach to running servers
    num_servers: int = 1  # launched by the project when urls is empty
    tp_size: int = 1
    dp_size: int = 1
    mem_fraction_static: float = 0.7
    base_port: int = 30000
    extra_args: list[str] = dataclasses.field(default_factory=list)
    log_dir: str | None = None
    weight_sync: str = "disk"  # disk | distributed
    startup_timeout_s: float = 900.0


@dataclasses.dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | sglang | vllm
    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    request_timeout_s: float = 600.0
    max_retries: int = 3
    batch_size: int = 64  # sequences per engine call (hf) or in flight per server (sglang)
    sglang: SGLangConfig = dataclasses.field(default_factory=SGLangConfig)

    def validate(self) -> None:
        check_choice("rollout.engine", self.engine, ("hf", "sglang", "vllm"))
        check_positive("rollout.n", self.n)
        check_positive("rollout.temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("rollout.top_p", self.top_p, "must lie in (0, 1].", "LSM paper uses 0.9; 1.0 disables.")
        check_positive("rollout.max_new_tokens", self.max_new_tokens)
        check_choice("rollout.sglang.weight_sync", self.sglang.weight_sync, ("disk", "distributed"))
