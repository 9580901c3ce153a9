"""``opd eval``: end to end on a tiny random model (hf engine), and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_opd.cli import main as opd
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from tests.eval.conftest import BENCHMARK_FILES, build_byte_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen3 whose vocabulary covers the byte tokenizer (259 tokens), saved with it."""
    out = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = build_byte_tokenizer()
    save_tiny_model(out, tiny_config(vocab_size=264, max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id))
    tokenizer.save_pretrained(str(out))
    return out


def test_opd_eval_on_a_tiny_model(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = f"{BENCHMARK_FILES[0]},{BENCHMARK_FILES[3]}"
    argv = ["eval", "--model", str(tiny_model), "--data", data, "--n", "2", "--max-new-tokens", "6"]
    argv += ["--engine", "hf", "--template", "gopd_math", "--out", str(tmp_path), "--code-timeout", "2"]
    assert opd(argv) == 0
    table = capsys.readouterr().out
    assert "aime24" in table and "livecodebench" in table and "pass@2" in table and "average" in table

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert set(summary["benchmarks"]) == {"aime24", "livecodebench"}
    assert summary["benchmarks"]["aime24"]["problems"] == 4 and summary["benchmarks"]["livecodebench"]["problems"] == 3
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == (4 + 3) * 2
    for s in samples:
        assert 1 <= s["response_tokens"] <= 6
        assert s["finish_reason"] in ("stop", "length")
        assert "Please reason step by step" in s["prompt"]
    lengths = [s["response_tokens"] for s in samples if s["benchmark"] == "aime24"]
    assert summary["benchmarks"]["aime24"]["length/max"] == max(lengths)
    truncated = sum(s["finish_reason"] == "length" for s in samples if s["benchmark"] == "aime24") / len(lengths)
    assert summary["benchmarks"]["aime24"]["truncated"] == truncated
    # a random model answers nothing: no boxed answer, no code block
    assert all(s["score"] == 0.0 for s in samples)


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = opd(["eval", *argv])
    return code, capsys.readouterr().err


def model_dir(tmp_path: Path, kind: str) -> Path:
    """A directory that is not a servable Hugging Face model, of the given kind."""
    path = tmp_path / kind
    if kind == "missing":
        return path
    path.mkdir()
    if kind == "no_weights":
        (path / "config.json").write_text("{}")
    elif kind == "megatron":
        (path / "latest_checkpointed_iteration.txt").write_text("10")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "is not a directory"),
        ("empty", "is neither a Hugging Face model directory"),
        ("no_weights", "has a config.json but no weights"),
        ("megatron", "is a Megatron checkpoint; opd eval serves Hugging Face weights. Fix: convert it with "
         "`opd convert mcore-to-hf`"),
    ],
)  # fmt: skip
def test_unsupported_model_dirs(kind: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _run(["--model", str(model_dir(tmp_path, kind)), "--data", BENCHMARK_FILES[0]], capsys)
    assert code == 2 and "--model=" in err and message in err


def test_bad_data_fails_before_the_model_loads(tiny_model: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(["--model", str(tiny_model), "--data", str(tmp_path / "nope.parquet")], capsys)
    assert code == 2 and "nope.parquet: data file not found" in err


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _run(["--model", str(tmp_path), "--data", BENCHMARK_FILES[0], "--n", "0"], capsys)
    assert code == 2 and "eval.n=0: must be > 0" in err
    with pytest.raises(SystemExit):
        opd(["eval", "--model", str(tmp_path), "--data", BENCHMARK_FILES[0], "--template", "qwen_math"])
    assert "invalid choice: 'qwen_math' (choose from" in capsys.readouterr().err
