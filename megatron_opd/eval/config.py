"""``eval:`` section of the run config (periodic held-out evaluation; ``opd eval`` fills the same)."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import ConfigError, check_positive
from megatron_opd.eval.templates import check_template


@dataclasses.dataclass
class EvalConfig:
    """How to sample and score benchmark files (verl parquet; one benchmark per ``data_source``).

    The papers' setting: ``n=32`` (math) or ``4`` (code), ``temperature=1.0``, ``top_p=1.0``,
    ``max_new_tokens=16384``; the defaults here are small, for periodic evaluation during training.
    """

    files: list[str] = dataclasses.field(default_factory=list)
    n: int = 1  # samples per problem: avg@n, pass@k for k in 1, 2, 4, ..., n
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    template: str | None = None  # a named prompt template (eval.templates); None: the dataset's prompt as is
    max_problems: int | None = None  # the first N problems of each benchmark; None: all
    seed: int | None = 0  # sample j of the call draws with seed + j; None: the engine's own seeds
    code_timeout_s: float = 6.0  # per test (a stdin/stdout run, or one function call)
    code_memory_mb: int = 2048  # address-space limit of a code sandbox
    reward_workers: int = 4  # code sandboxes run at once
    teacher: bool = False  # the trainer also evaluates each teacher once, for reference

    def validate(self) -> None:
        check_positive("eval.n", self.n)
        check_positive("eval.max_new_tokens", self.max_new_tokens)
        check_positive("eval.temperature", self.temperature, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("eval.top_p", self.top_p, "must lie in (0, 1].", "1.0 disables nucleus sampling.")
        if self.top_k != -1 and self.top_k < 1:
            raise ConfigError("eval.top_k", self.top_k, "must be -1 (off) or >= 1.", "set eval.top_k=-1.")
        if self.template is not None:
            check_template(self.template)
        if self.max_problems is not None:
            check_positive("eval.max_problems", self.max_problems)
        check_positive("eval.code_timeout_s", self.code_timeout_s)
        check_positive("eval.code_memory_mb", self.code_memory_mb)
        check_positive("eval.reward_workers", self.reward_workers)
