"""``opd convert`` end to end (TP=2, bf16, through the CLI and tools/convert_checkpoint.py), ExPO
against a direct computation, and bad input: each a clear error with nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_opd.convert import cli
from megatron_opd.convert.extrapolate import iter_extrapolated
from megatron_opd.convert.hf_io import HFCheckpointReader
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from tests.tolerance import ulps

REPO = Path(__file__).resolve().parents[2]


def _convert(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = cli.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "dense"
    save_tiny_model(path, tiny_config(num_hidden_layers=2), seed=7)
    (path / "tokenizer.json").write_text('{"stand-in": true}')
    return path


@pytest.mark.slow
def test_hf_to_mcore_to_hf_tp2_bf16(tmp_path: Path, dense: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    code, out = _convert(
        capsys, "hf-to-mcore", "--hf-dir", str(dense), "--out", str(ckpt), "--tp", "2", "--dtype", "bf16"
    )
    assert code == 0, out
    assert "peak RSS" in out and (ckpt / "hf" / "tokenizer.json").is_file()
    tool = REPO / "tools" / "convert_checkpoint.py"
    run = subprocess.run(
        [sys.executable, str(tool), "mcore-to-hf", "--mcore-dir", str(ckpt), "--out", str(back), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    src, got = HFCheckpointReader(dense), HFCheckpointReader(back)
    assert got.keys() == src.keys()
    for name in src.keys():
        assert torch.equal(got.get(name), src.get(name).to(torch.bfloat16)), name
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    assert (back / "tokenizer.json").read_text() == '{"stand-in": true}'
    assert (back / "model.safetensors.index.json").is_file()

    # an existing --out is refused and left as it was
    code, out = _convert(capsys, "hf-to-mcore", "--hf-dir", str(dense), "--out", str(ckpt))
    assert code == 1 and "already exists; pass --overwrite" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").is_file()


def test_extrapolate_matches_direct_computation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config(num_hidden_layers=2, tie_word_embeddings=True)
    dirs = [tmp_path / n for n in ("student", "t1", "t2")]
    for seed, d in enumerate(dirs):
        save_tiny_model(d, cfg, seed=seed)
    out = tmp_path / "expo"
    code, text = _convert(
        capsys, "extrapolate", "--student", str(dirs[0]), "--teachers", str(dirs[1]), str(dirs[2]),
        "--alpha", "0.5", "--out", str(out),
    )  # fmt: skip
    assert code == 0, text
    student, t1, t2, got = (HFCheckpointReader(d) for d in (*dirs, out))
    assert got.keys() == student.keys()
    for name in student.keys():
        avg = (t1.get(name).double() + t2.get(name).double()) / 2
        want = avg + 0.5 * (avg - student.get(name).double())
        # fp32 against float64: four roundings (sum, mean, scale, subtraction) at the operands' magnitude, and one
        # at the result's in the output dtype
        operands = 1.5 * torch.maximum(t1.get(name).abs(), t2.get(name).abs()) + 0.5 * student.get(name).abs()
        atol = ulps(torch.float32, operands.max(), 4) + ulps(got.dtype(name), want.abs().max(), 1)
        torch.testing.assert_close(got.get(name).double(), want, rtol=0, atol=atol, msg=name)
        assert got.get(name).dtype == student.get(name).dtype
    # in blocks of a few rows: the same numbers
    for name, tensor in iter_extrapolated(student, [t1, t2], 0.5, block_bytes=1024):
        assert torch.equal(tensor, got.get(name)), name


def _llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(str(path))


def _sharded(path: Path) -> list[Path]:
    model = save_tiny_model(path, tiny_config(num_hidden_layers=2), seed=1)
    model.save_pretrained(str(path), max_shard_size="20KB")
    (path / "model.safetensors").unlink(missing_ok=True)
    return sorted(path.glob("model-*.safetensors"))


def test_bad_input_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, dense: Path, capsys: pytest.CaptureFixture
) -> None:
    outs = tmp_path / "outs"
    outs.mkdir()

    def fails(expect: str, *argv: str) -> None:
        code, text = _convert(capsys, *argv, "--out", str(outs / "x"))
        assert code == 1 and expect in text, text
        assert "Traceback" not in text
        assert not (outs / "x").exists() and _leftovers(outs) == []

    llama = tmp_path / "llama"
    _llama(llama)
    fails("model_type='llama' is not supported", "hf-to-mcore", "--hf-dir", str(llama))

    missing = tmp_path / "missing"
    shards = _sharded(missing)
    assert len(shards) > 1
    shards[-1].unlink()
    fails(
        f"shard {shards[-1].name} named in model.safetensors.index.json is missing",
        "hf-to-mcore",
        "--hf-dir",
        str(missing),
    )

    truncated = tmp_path / "truncated"
    shards = _sharded(truncated)
    with shards[0].open("r+b") as f:
        f.truncate(shards[0].stat().st_size - 100)
    fails("may be truncated or corrupt", "hf-to-mcore", "--hf-dir", str(truncated))

    fails("--tp=3 does not divide num_attention_heads=4", "hf-to-mcore", "--hf-dir", str(dense), "--tp", "3")
    fails("expert parallelism needs an MoE model", "hf-to-mcore", "--hf-dir", str(dense), "--ep", "2")
    moe = tmp_path / "moe"
    save_tiny_model(moe, tiny_config(moe=True, num_experts=6), seed=2)
    fails("--ep=4 does not divide num_experts=6", "hf-to-mcore", "--hf-dir", str(moe), "--ep", "4")

    fails("not a Megatron checkpoint", "mcore-to-hf", "--mcore-dir", str(dense))

    other = tmp_path / "other"
    save_tiny_model(other, tiny_config(num_hidden_layers=2, hidden_size=32, head_dim=8), seed=3)
    fails(
        "ExPO needs models of one architecture",
        "extrapolate",
        "--student",
        str(dense),
        "--teachers",
        str(other),
        "--alpha",
        "0.5",
    )

    existing = outs / "x"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    code, text = _convert(
        capsys,
        "extrapolate",
        "--student",
        str(dense),
        "--teachers",
        str(dense),
        "--alpha",
        "0.5",
        "--out",
        str(existing),
    )
    assert code == 1 and "already exists; pass --overwrite" in text
    assert (existing / "keep").read_text() == "mine"


def test_overwrite_replaces_the_output(tmp_path: Path, dense: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "expo"
    out.mkdir()
    (out / "stale").write_text("old")
    code, text = _convert(
        capsys, "extrapolate", "--student", str(dense), "--teachers", str(dense), "--alpha", "0.25",
        "--out", str(out), "--overwrite",
    )  # fmt: skip
    assert code == 0, text
    assert not (out / "stale").exists() and (out / "config.json").is_file()
    assert _leftovers(tmp_path) == []


def test_parse_size() -> None:
    assert cli.parse_size("2GiB") == 2 * 2**30 and cli.parse_size("500MB") == 500 * 10**6 and cli.parse_size("17") == 17
    for bad in ("", "2 parsecs", "0"):
        with pytest.raises(Exception, match="size"):
            cli.parse_size(bad)
