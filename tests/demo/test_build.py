"""build_demo_assets: layout, HF loadability, manifest reuse, determinism (on tiny recipes: seconds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from megatron_opd.demo import build as build_mod
from megatron_opd.demo.build import DemoAssets, DemoRecipe, ModelRecipe, build_demo_assets
from megatron_opd.demo.sft import SFTRecipe
from megatron_opd.demo.task import TaskSpec

TINY = DemoRecipe(
    task=TaskSpec(max_operand=19, n_val=16, n_test=16),
    teacher=ModelRecipe(sft=SFTRecipe(steps=3, batch_size=8), hidden_size=32, head_dim=8, intermediate_size=64),
    student=ModelRecipe(
        sft=SFTRecipe(steps=2, batch_size=8, seed=1),
        hidden_size=32,
        head_dim=8,
        intermediate_size=64,
        init_seed=1,
        carry_drop=0.8,
    ),
)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("tiny"), recipe=TINY)


def test_layout_and_loadability(tiny: DemoAssets) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for model_dir in (tiny.teacher, tiny.student):
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        cfg = AutoConfig.from_pretrained(str(model_dir))
        assert cfg.model_type == "qwen3" and cfg.vocab_size == len(tok) and cfg.vocab_size % 8 == 0
        assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        assert model.config.hidden_size == 32
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    sizes = {f: pq.read_metadata(f).num_rows for f in (tiny.train_file, tiny.val_file, tiny.test_file)}
    n_carry = sum(a % 10 + b % 10 > 9 for a in range(20) for b in range(20))  # operands < 20: units carries
    assert list(sizes.values()) == [n_carry - 32, 16, 16]
    prompts = {f: {r[0]["content"] for r in pq.read_table(f).column("prompt").to_pylist()} for f in sizes}
    train, val, test = prompts.values()
    assert not (train & val or train & test or val & test)
    manifest = tiny.read_manifest()
    assert manifest is not None and manifest["recipe_hash"] == TINY.digest()
    assert set(manifest["measured"]) >= {"teacher_val_greedy", "student_val_greedy"}


def test_matching_manifest_is_reused_and_force_rebuilds(tiny: DemoAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(build_mod, "train_model", no_training)
    assert build_demo_assets(tiny.root, recipe=TINY) == tiny
    with pytest.raises(AssertionError, match="rebuilt"):
        build_demo_assets(tiny.root, recipe=TINY, force=True)
    assert tiny.read_manifest() is None  # an interrupted build leaves no manifest: the next call rebuilds
    monkeypatch.undo()
    build_demo_assets(tiny.root, recipe=TINY)
    assert tiny.read_manifest() is not None


def test_same_seed_same_bytes_other_seed_other_weights(tiny: DemoAssets, tmp_path: Path) -> None:
    again = build_demo_assets(tmp_path / "again", recipe=TINY)
    a, b = files_of(tiny.root), files_of(again.root)
    a.pop("manifest.json"), b.pop("manifest.json")  # holds timings
    assert a.keys() == b.keys() and a == b
    other = build_demo_assets(tmp_path / "seed1", seed=1, recipe=TINY)
    c = files_of(other.root)
    assert c["teacher/model.safetensors"] != a["teacher/model.safetensors"]
    assert c["data/test.parquet"] == a["data/test.parquet"]  # the seed changes the models, not the splits


def test_recipe_digest_is_stable_and_tracks_fields() -> None:
    same = dataclasses.replace(TINY, student=dataclasses.replace(TINY.student))
    assert same.digest() == TINY.digest()
    assert (
        dataclasses.replace(TINY, student=dataclasses.replace(TINY.student, carry_drop=0.5)).digest() != TINY.digest()
    )
    assert (
        dataclasses.replace(TINY, task=TaskSpec(max_operand=19, n_val=16, n_test=16, seed=1)).digest() != TINY.digest()
    )
