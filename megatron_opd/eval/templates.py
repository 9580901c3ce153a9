"""Named prompt templates: wrap a problem's question in the instructions a paper evaluated with.

A template rewrites the content of the row's last user message (``{question}``); the chat template
of the tokenizer is applied afterwards as for any prompt. The G-OPD/ExOPD paper (appendix C) uses
the same templates for training and evaluation with Qwen3 in non-thinking mode.
"""

from __future__ import annotations

from typing import Any

from megatron_opd.config.errors import ConfigError

PROMPT_TEMPLATES: dict[str, str] = {
    # G-OPD/ExOPD paper, appendix C: math reasoning (AIME24/25, HMMT25)
    "gopd_math": "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    # G-OPD/ExOPD paper, appendix C: code generation (HumanEval+, MBPP+, LiveCodeBench)
    "gopd_code": (
        "{question}\nWrite Python code to solve the problem. Present the code in\n```python\nYour code\n```\n"
        "at the end.\nYou need to think first then write the Python code."
    ),
}


def check_template(name: str, key: str = "eval.template") -> str:
    """The template text of ``name``; a ``ConfigError`` listing the known names otherwise."""
    if name not in PROMPT_TEMPLATES:
        raise ConfigError(key, name, "unknown prompt template.", f"use one of {', '.join(PROMPT_TEMPLATES)}.")
    return PROMPT_TEMPLATES[name]


def apply_template(messages: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose last user message's content is put into template ``name``."""
    template = check_template(name)
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError(f"prompt template {name!r}: the prompt has no user message to put into it.")
    out = [dict(m) for m in messages]
    out[users[-1]]["content"] = template.replace("{question}", out[users[-1]]["content"])
    return out
