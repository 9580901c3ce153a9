"""``data:`` section of the run config (verl parquet schema)."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import ConfigError, check_choice, check_positive


@dataclasses.dataclass
class DataConfig:
    train_files: list[str] = dataclasses.field(default_factory=list)
    val_files: list[str] = dataclasses.field(default_factory=list)
    prompt_key: str = "prompt"
    train_batch_size: int = 8  # prompts per step
    max_prompt_length: int = 1024
    truncation: str = "error"  # error | left | right
    filter_overlong_prompts: bool = False
    enable_thinking: bool = False
    chat_template: str | None = None  # a Jinja template overriding the tokenizer's
    shuffle: bool = True
    seed: int = 1
    allow_tokenizer_mismatch: bool = False

    def validate(self) -> None:
        if not self.train_files:
            raise ConfigError(
                "data.train_files",
                self.train_files,
                "no training data given.",
                "set data.train_files=[path/to/train.parquet].",
            )
        check_positive("data.train_batch_size", self.train_batch_size)
        check_positive("data.max_prompt_length", self.max_prompt_length)
        check_choice("data.truncation", self.truncation, ("error", "left", "right"))
