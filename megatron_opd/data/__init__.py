"""Prompt data: verl-schema parquet datasets, chat templates, batching, tokenizer checks."""

from megatron_opd.data.config import DataConfig
from megatron_opd.data.dataset import DataError, PromptDataset, PromptSample, read_rows
from megatron_opd.data.loader import PromptLoader
from megatron_opd.data.templates import ChatTemplateError
from megatron_opd.data.tokenizer import TokenizerError, check_tokenizers, load_tokenizer

__all__ = [
    "ChatTemplateError",
    "DataConfig",
    "DataError",
    "PromptDataset",
    "PromptLoader",
    "PromptSample",
    "TokenizerError",
    "check_tokenizers",
    "load_tokenizer",
    "read_rows",
]
