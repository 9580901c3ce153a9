"""The demo's character-level tokenizer: a real Hugging Face tokenizer directory with a Qwen-style chat template.

Every printable character the demo uses is one token; the role names of the chat template (``user``,
``assistant``, ``system``) are single added tokens so prompts stay short (every token costs CPU time).
The vocabulary size is a multiple of 8 (56 tokens; reserved special tokens would pad it if the character set
changed) so any TP size up to 8 divides it.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
ROLE_TOKENS = ("system", "user", "assistant")
CHARS = "\n " + string.digits + "+-*=()\\{}.,?" + string.ascii_lowercase
VOCAB_MULTIPLE = 8

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def vocabulary() -> list[str]:
    """All tokens in id order: special tokens, characters, role names, reserved padding tokens."""
    tokens = list(SPECIAL_TOKENS) + list(CHARS) + list(ROLE_TOKENS)
    n_reserved = -len(tokens) % VOCAB_MULTIPLE
    return tokens + [f"<|reserved_{i}|>" for i in range(n_reserved)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level ``PreTrainedTokenizerFast`` (EOS ``<|im_end|>``, pad ``<|endoftext|>``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(vocab)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    specials = [t for t in vocab if t.startswith("<|")]
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=PAD,
        additional_special_tokens=[t for t in specials if t not in (IM_END, PAD)],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == len(vocab), (len(tok), len(vocab))
    return tok


def save_tokenizer(out_dir: str | Path) -> None:
    """Write the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...) into ``out_dir``."""
    build_tokenizer().save_pretrained(str(out_dir))
