"""Evaluation fixtures: a byte-level tokenizer with a ChatML chat template (every text encodes, no
download), the example benchmarks, and a scripted engine that answers them right or wrong."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from megatron_opd.rollout.base import Completion, SamplingParams

FIXTURES = Path(__file__).parent / "fixtures"
BENCHMARK_FILES = [str(FIXTURES / f) for f in ("aime.parquet", "humanevalplus.parquet", "mbppplus.parquet")]
BENCHMARK_FILES.append(str(FIXTURES / "livecodebench.parquet"))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_byte_tokenizer() -> Any:
    """Byte-level BPE without merges: one token per byte (ids 0..255), then the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def responses() -> dict[str, dict[str, str]]:
    """question (the row's user message) -> {"right": response, "wrong": response}."""
    return json.loads((FIXTURES / "responses.json").read_text())


class ScriptedEngine:
    """A rollout engine answering known questions: ``right(question, k)`` decides whether the k-th
    sample (0-based, counted per question within one ``generate`` call) is the right answer."""

    def __init__(self, tokenizer: Any, responses: dict[str, dict[str, str]], right: Callable[[str, int], bool]):
        self.tokenizer, self.responses, self.right = tokenizer, responses, right
        self.prompts: list[str] = []  # every prompt seen, decoded

    def _question(self, prompt: str) -> str:
        found = [q for q in self.responses if q in prompt]
        assert len(found) == 1, f"no unique known question in the prompt: {prompt[:200]!r}"
        return found[0]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        seen: Counter[str] = Counter()
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            question = self._question(text)
            kind = "right" if self.right(question, seen[question]) else "wrong"
            seen[question] += 1
            tokens = self.tokenizer.encode(self.responses[question][kind], add_special_tokens=False)
            tokens.append(self.tokenizer.eos_token_id)
            out.append(Completion(list(ids), tokens, [0.0] * len(tokens), "stop"))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        raise AssertionError("evaluation never updates weights")

    def weights_dir(self) -> str | None:
        return None

    def update_weights_from_dir(self, path: str) -> None:
        raise AssertionError("evaluation never updates weights")

    def health(self) -> bool:
        return True

    def server_stats(self) -> dict[str, float]:
        return {}

    def shutdown(self) -> None:
        pass
