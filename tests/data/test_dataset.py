"""PromptDataset: verl-schema rows, chat templates, truncation, validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_opd.data import ChatTemplateError, DataConfig, DataError, PromptDataset, load_tokenizer
from tests.data.conftest import QWEN3_STYLE_TEMPLATE, build_char_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok(char_tokenizer_dir: Path):
    return load_tokenizer(char_tokenizer_dir)


def write_rows(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def row(content: str = "hi", **overrides) -> dict:
    r = {
        "data_source": "math",
        "prompt": [{"role": "user", "content": content}],
        "reward_model": {"ground_truth": "1"},
        "extra_info": {"index": 0},
    }
    r.update(overrides)
    return r


def expected_text(messages: list[dict], thinking: bool) -> str:
    """The Qwen3-style template written out by hand (independent of Jinja)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n")


@pytest.mark.parametrize("thinking", [True, False])
def test_fixture_rows_and_template(tok, thinking: bool) -> None:
    cfg = DataConfig(max_prompt_length=512, enable_thinking=thinking)
    ds = PromptDataset([str(FIXTURES / "math.parquet"), str(FIXTURES / "code.parquet")], tok, cfg)
    rows = pq.read_table(FIXTURES / "math.parquet").to_pylist() + pq.read_table(FIXTURES / "code.parquet").to_pylist()
    assert len(ds) == len(rows) == 12
    for i, (s, r) in enumerate(zip(ds, rows)):
        assert s.index == i
        assert s.messages == r["prompt"]
        assert s.data_source == r["data_source"]
        assert s.ground_truth == r["reward_model"]["ground_truth"]
        assert s.teacher is None
        # special tokens are single ids, every other character one id
        assert tok.decode(s.prompt_ids) == expected_text(r["prompt"], thinking)
        assert s.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert ("</think>" in tok.convert_ids_to_tokens(s.prompt_ids)) is (not thinking)
    assert ds[0].ground_truth == "5" and "\\boxed{}" in ds[0].messages[0]["content"]
    assert json.loads(ds[8].ground_truth)["outputs"] == ["3\n", "12\n"]
    assert ds[8].origin.endswith("code.parquet row 0")


def test_multi_teacher_routing(tok) -> None:
    ds = PromptDataset(str(FIXTURES / "multi_teacher.parquet"), tok, DataConfig(), teacher_names=["math", "code"])
    assert [s.teacher for s in ds] == ["math"] * 4 + ["code"] * 4
    assert {s.data_source for s in ds if s.teacher == "code"} == {"code"}


def test_single_teacher_is_the_default(tok, tmp_path: Path) -> None:
    f = write_rows(tmp_path / "a.parquet", [row(), row()])
    assert [s.teacher for s in PromptDataset(f, tok, DataConfig(), teacher_names=["t"])] == ["t", "t"]


def test_unknown_teacher_names_row_and_file(tok) -> None:
    with pytest.raises(DataError, match=r"multi_teacher.parquet row 0: extra_info.opd_teacher='math'.*one of a, b"):
        PromptDataset(str(FIXTURES / "multi_teacher.parquet"), tok, DataConfig(), teacher_names=["a", "b"])


def test_missing_teacher_with_several_teachers(tok, tmp_path: Path) -> None:
    f = write_rows(tmp_path / "a.parquet", [row()])
    with pytest.raises(DataError, match=r"row 0: no extra_info\.opd_teacher, but 2 teachers"):
        PromptDataset(f, tok, DataConfig(), teacher_names=["a", "b"])


def test_missing_prompt(tok, tmp_path: Path) -> None:
    f = write_rows(tmp_path / "a.parquet", [{"data_source": "math", "question": "x"}])
    with pytest.raises(DataError, match=r"a.parquet row 0: missing field 'prompt'"):
        PromptDataset(f, tok, DataConfig())


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"prompt": "just a string"}, r"row 1: field 'prompt' must be a non-empty list"),
        ({"prompt": []}, r"row 1: field 'prompt' must be a non-empty list"),
        ({"prompt": [{"role": "user", "content": 3}]}, r"row 1: prompt\[0\] must be a dict with string"),
        ({"prompt": [{"role": "robot", "content": "x"}]}, r"row 1: prompt\[0\].role='robot'"),
        ({"data_source": 5}, r"row 1: field 'data_source' must be a non-empty string"),
        ({"reward_model": "5"}, r"row 1: field 'reward_model' must be a mapping"),
        ({"extra_info": {"opd_teacher": 1}}, r"row 1: extra_info.opd_teacher must be a string"),
    ],
)
def test_wrong_types_name_the_row(tok, tmp_path: Path, bad: dict, match: str) -> None:
    f = tmp_path / "a.jsonl"  # JSON lines: each row may have its own types (parquet forces one per column)
    f.write_text(json.dumps(row()) + "\n" + json.dumps(row(**bad)) + "\n")
    with pytest.raises(DataError, match=match):
        PromptDataset(str(f), tok, DataConfig())


def test_overlong_prompt_modes(tok, tmp_path: Path) -> None:
    f = write_rows(tmp_path / "a.parquet", [row("short"), row("x" * 100)])
    full = PromptDataset(f, tok, DataConfig(max_prompt_length=1000))
    long_ids = full[1].prompt_ids
    limit = len(full[0].prompt_ids) + 5
    assert len(long_ids) > limit
    with pytest.raises(DataError, match=rf"a.parquet row 1: the templated prompt has {len(long_ids)} tokens"):
        PromptDataset(f, tok, DataConfig(max_prompt_length=limit))
    left = PromptDataset(f, tok, DataConfig(max_prompt_length=limit, truncation="left"))
    right = PromptDataset(f, tok, DataConfig(max_prompt_length=limit, truncation="right"))
    assert left[1].prompt_ids == long_ids[-limit:] and right[1].prompt_ids == long_ids[:limit]
    assert left[0].prompt_ids == right[0].prompt_ids == full[0].prompt_ids
    kept = PromptDataset(f, tok, DataConfig(max_prompt_length=limit, filter_overlong_prompts=True))
    assert len(kept) == 1 and kept.num_filtered == 1 and kept[0].prompt_ids == full[0].prompt_ids
    with pytest.raises(DataError, match="all 2 rows are longer"):
        PromptDataset(f, tok, DataConfig(max_prompt_length=3, filter_overlong_prompts=True))


def test_empty_and_missing_files(tok, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file has no rows"):
        PromptDataset(str(empty), tok, DataConfig())
    with pytest.raises(DataError, match=r"nope\.parquet: data file not found"):
        PromptDataset(str(tmp_path / "nope.parquet"), tok, DataConfig())
    with pytest.raises(DataError, match="no data files given"):
        PromptDataset([], tok, DataConfig())
    bad = tmp_path / "a.csv"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        PromptDataset(str(bad), tok, DataConfig())


def test_tokenizer_without_chat_template(tmp_path: Path) -> None:
    plain = build_char_tokenizer(chat_template=None)
    f = write_rows(tmp_path / "a.parquet", [row("abc")])
    with pytest.raises(ChatTemplateError, match=r"has no chat template\. Fix: set data\.chat_template"):
        PromptDataset(f, plain, DataConfig())
    ds = PromptDataset(f, plain, DataConfig(chat_template=QWEN3_STYLE_TEMPLATE, enable_thinking=True))  # text
    assert plain.decode(ds[0].prompt_ids) == expected_text(row("abc")["prompt"], thinking=True)
    path = tmp_path / "t.jinja"
    path.write_text(QWEN3_STYLE_TEMPLATE)
    ds2 = PromptDataset(f, plain, DataConfig(chat_template=str(path), enable_thinking=False))  # template file
    assert plain.decode(ds2[0].prompt_ids) == expected_text(row("abc")["prompt"], thinking=False)
    with pytest.raises(ChatTemplateError, match="neither a Jinja template nor an existing file"):
        PromptDataset(f, plain, DataConfig(chat_template=str(tmp_path / "missing.jinja")))
