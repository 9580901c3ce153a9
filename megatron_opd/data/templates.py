"""Chat templates: chat messages -> the prompt token ids the student continues.

The template is the student tokenizer's own (``tokenizer.chat_template``) unless
``data.chat_template`` overrides it (Jinja text, or the path of a file holding it). It is rendered
with ``add_generation_prompt=True`` and ``enable_thinking`` (Qwen3's switch: off appends an empty
``<think></think>`` block), then tokenized without adding special tokens (the template has them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """No usable chat template."""


def resolve_chat_template(tokenizer: Any, override: str | None) -> str:
    """The Jinja template to use: ``override`` (text or file path) or the tokenizer's own."""
    if override:
        if "{" not in override and Path(override).is_file():
            return Path(override).read_text()
        if "{" not in override:
            raise ChatTemplateError(
                f"data.chat_template={override!r} is neither a Jinja template nor an existing file. "
                "Fix: give the template text or the path of a .jinja file."
            )
        return override
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"the tokenizer {name!r} has no chat template. Fix: set data.chat_template to a Jinja template "
            "(text or file path), or use the instruct/chat model's tokenizer."
        )
    if isinstance(template, dict):  # several named templates: the default one renders chat messages
        if "default" not in template:
            raise ChatTemplateError(
                f"the tokenizer has named chat templates {sorted(template)} but no 'default'. "
                "Fix: set data.chat_template to the one to use."
            )
        template = template["default"]
    return template


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], template: str, enable_thinking: bool) -> str:
    """The prompt text of ``messages`` under ``template``, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def encode_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts (special tokens come from the template, none are added)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
