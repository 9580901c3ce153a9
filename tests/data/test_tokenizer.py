"""load_tokenizer and the teacher/student tokenizer check."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_opd.data import TokenizerError, check_tokenizers, load_tokenizer
from tests.data.conftest import build_char_tokenizer


def test_load_tokenizer(char_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(char_tokenizer_dir)
    assert tok.eos_token == "<|im_end|>" and tok.decode(tok("ab c")["input_ids"]) == "ab c"
    with pytest.raises(TokenizerError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="no loadable tokenizer"):
        load_tokenizer(tmp_path)


def test_same_tokenizers_pass() -> None:
    student = build_char_tokenizer()
    (cmp,) = check_tokenizers(student, {"t": build_char_tokenizer()})
    assert cmp.compatible and cmp.teacher_only == 0
    assert cmp.special_student["eos_token"] == "<|im_end|>" and cmp.special_student == cmp.special_teacher


def test_teacher_with_extra_tokens_passes() -> None:
    (cmp,) = check_tokenizers(build_char_tokenizer(), {"big": build_char_tokenizer(extra_tokens=("<tool>",))})
    assert cmp.compatible and cmp.teacher_only == 1


def test_mismatch_is_an_error_unless_allowed() -> None:
    student = build_char_tokenizer()
    teacher = build_char_tokenizer()
    # a teacher whose vocabulary swaps two ids
    vocab = teacher.get_vocab()
    a, b = vocab["a"], vocab["b"]
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    swapped = dict(vocab, a=b, b=a)
    core = Tokenizer(models.WordLevel(swapped, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    bad = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    with pytest.raises(
        TokenizerError, match=r"(?s)\['bad'\] do not match.*'a' student \d+ / teacher \d+.*allow_tokenizer_mismatch"
    ):
        check_tokenizers(student, {"good": teacher, "bad": bad})
    cmps = check_tokenizers(student, {"good": teacher, "bad": bad}, allow_mismatch=True)
    assert [c.compatible for c in cmps] == [True, False]
    assert sorted(t for t, _, _ in cmps[1].different_ids) == ["a", "b"]
    assert "special tokens differ" in cmps[1].describe()  # EOS differs: listed


def test_student_token_unknown_to_teacher() -> None:
    student = build_char_tokenizer(extra_tokens=("<tool>",))
    with pytest.raises(TokenizerError, match=r"1 student tokens unknown to the teacher, e\.g\. '<tool>'"):
        check_tokenizers(student, {"t": build_char_tokenizer()})
