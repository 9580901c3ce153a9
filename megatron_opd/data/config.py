"""``data:`` section of the run config: prompts in the verl parquet schema, how they are templated,
truncated and batched. Field names follow verl's ``data:`` section where verl has one."""

from __future__ import annotations

import dataclasses

from megatron_opd.config.errors import ConfigError, check_choice, check_positive


@dataclasses.dataclass
class DataConfig:
    train_files: list[str] = dataclasses.field(default_factory=list)  # .parquet or .jsonl, concatenated in order
    val_files: list[str] = dataclasses.field(default_factory=list)
    prompt_key: str = "prompt"  # column holding the chat messages
    train_batch_size: int = 8  # prompts per step (each sampled rollout.n times)
    max_prompt_length: int = 1024  # tokens after the chat template
    truncation: str = "error"  # error | left (keep the end) | right (keep the start)
    filter_overlong_prompts: bool = False  # drop overlong prompts at load instead of truncating
    enable_thinking: bool = False  # passed to the chat template (Qwen3: thinking on/off)
    chat_template: str | None = None  # Jinja template (text or a file path) overriding the tokenizer's
    shuffle: bool = True
    seed: int = 1  # epoch e is shuffled with (seed, e)
    allow_tokenizer_mismatch: bool = False  # teacher tokenizers that differ from the student's

    def validate(self) -> None:
        if not self.train_files:
            raise ConfigError(
                "data.train_files",
                self.train_files,
                "no training data given.",
                "set data.train_files=[path/to/train.parquet].",
            )
        if not self.prompt_key:
            raise ConfigError("data.prompt_key", self.prompt_key, "must name a column.", "use prompt (verl's default).")
        check_positive("data.train_batch_size", self.train_batch_size)
        check_positive("data.max_prompt_length", self.max_prompt_length)
        check_choice("data.truncation", self.truncation, ("error", "left", "right"))
