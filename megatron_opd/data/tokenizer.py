"""Loading the student's tokenizer and checking that teachers tokenize the same way.

Token-level distillation compares the student's and a teacher's distributions id by id, so every
token the student can emit must mean the same string to the teacher. :func:`check_tokenizers`
verifies that before any model is built: a token present in both vocabularies must have the same
id, and every student token must exist in the teacher's vocabulary. Special tokens (EOS, pad, BOS
and the additional ones) are listed in the report so differences are visible in the logs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SHOWN = 5  # mismatching tokens quoted in an error message
# a directory without any of these has no tokenizer (transformers would build an empty one from config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, or teacher/student tokenizers that disagree."""


def load_tokenizer(model_dir: str | Path) -> Any:
    """The ``transformers.AutoTokenizer`` of a local model directory (never downloads)."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory not found; give a local Hugging Face model directory.")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}). Fix: copy the tokenizer of the "
            "original model next to config.json."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"{path}: no loadable tokenizer ({e}). The directory needs tokenizer.json or the files of a "
            "slow tokenizer next to config.json; copy them from the original model."
        ) from e


def special_tokens(tok: Any) -> dict[str, str | None]:
    """The named special tokens of a tokenizer plus its additional special tokens, name -> token."""
    named = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    extra = sorted(set(tok.all_special_tokens) - {v for v in named.values() if v})
    return {**named, **{f"special[{i}]": t for i, t in enumerate(extra)}}


@dataclasses.dataclass
class TokenizerComparison:
    """How one teacher's tokenizer relates to the student's."""

    teacher: str
    different_ids: list[tuple[str, int, int]]  # (token, student id, teacher id)
    missing_in_teacher: list[tuple[str, int]]  # student tokens the teacher does not have
    teacher_only: int  # teacher tokens the student does not have (harmless: the student never emits them)
    special_student: dict[str, str | None]
    special_teacher: dict[str, str | None]

    @property
    def compatible(self) -> bool:
        return not self.different_ids and not self.missing_in_teacher

    def describe(self) -> str:
        lines = [f"teacher {self.teacher!r}: " + ("same token ids as the student" if self.compatible else "MISMATCH")]
        if self.different_ids:
            shown = ", ".join(f"{t!r} student {s} / teacher {u}" for t, s, u in self.different_ids[:_SHOWN])
            lines.append(f"  {len(self.different_ids)} shared tokens with different ids, e.g. {shown}")
        if self.missing_in_teacher:
            shown = ", ".join(f"{t!r} (id {i})" for t, i in self.missing_in_teacher[:_SHOWN])
            lines.append(f"  {len(self.missing_in_teacher)} student tokens unknown to the teacher, e.g. {shown}")
        if self.teacher_only:
            lines.append(f"  {self.teacher_only} teacher-only tokens (never emitted by the student)")
        if self.special_student != self.special_teacher:
            lines.append(f"  special tokens differ: student {self.special_student}, teacher {self.special_teacher}")
        else:
            lines.append(f"  special tokens: {self.special_student}")
        return "\n".join(lines)


def compare_tokenizers(student: Any, teacher: Any, teacher_name: str) -> TokenizerComparison:
    """Compare the full vocabularies (added tokens included) of two tokenizers."""
    s_vocab: dict[str, int] = student.get_vocab()
    t_vocab: dict[str, int] = teacher.get_vocab()
    different = sorted(
        ((tok, i, t_vocab[tok]) for tok, i in s_vocab.items() if tok in t_vocab and t_vocab[tok] != i),
        key=lambda x: x[1],
    )
    missing = sorted(((tok, i) for tok, i in s_vocab.items() if tok not in t_vocab), key=lambda x: x[1])
    return TokenizerComparison(
        teacher=teacher_name,
        different_ids=different,
        missing_in_teacher=missing,
        teacher_only=sum(1 for tok in t_vocab if tok not in s_vocab),
        special_student=special_tokens(student),
        special_teacher=special_tokens(teacher),
    )


def check_tokenizers(student: Any, teachers: dict[str, Any], allow_mismatch: bool = False) -> list[TokenizerComparison]:
    """Check every teacher's tokenizer against the student's; log the comparison.

    Raises :class:`TokenizerError` on a mismatch unless ``allow_mismatch`` (then it only warns).
    """
    comparisons = [compare_tokenizers(student, tok, name) for name, tok in teachers.items()]
    bad = [c for c in comparisons if not c.compatible]
    for c in comparisons:
        (logger.warning if not c.compatible else logger.info)("tokenizer check: %s", c.describe())
    if bad and not allow_mismatch:
        details = "\n".join(c.describe() for c in bad)
        raise TokenizerError(
            f"teacher tokenizer(s) {[c.teacher for c in bad]} do not match the student's:\n{details}\n"
            "Token-level distillation needs the same token ids. Fix: use teachers that share the student's "
            "tokenizer, or set data.allow_tokenizer_mismatch=true if you know the differences are harmless."
        )
    return comparisons
