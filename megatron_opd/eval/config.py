"""``eval:`` section of the run config (periodic held-out evaluation, also ``opd eval``)."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import check_positive


@dataclasses.dataclass
class EvalConfig:
    files: list[str] = dataclasses.field(default_factory=list)
    n: int = 1  # samples per problem (avg@n, pass@k for k <= n)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    template: str | None = None  # a named prompt template; None = the dataset's prompt as is
    max_problems: int | None = None

    def validate(self) -> None:
        check_positive("eval.n", self.n)
        check_positive("eval.max_new_tokens", self.max_new_tokens)
