"""Config loading and validation: each class of bad input gives a ConfigError naming the key and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_opd.config import ConfigError, load_config, to_yaml
from megatron_opd.config.schema import ModelConfig, ParallelConfig, TeacherConfig
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.objectives.registry import objective_class


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cfg_models")
    out = {}
    for name, cfg in {
        "dense": tiny_config(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4),
        "moe": tiny_config(moe=True, num_experts=4),
        "other_vocab": tiny_config(vocab_size=96),
    }.items():
        save_tiny_model(root / name, cfg)
        out[name] = str(root / name)
    return out


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def base_yaml(models: dict[str, str], extra: str = "") -> str:
    return f"""
student:
  path: {models["dense"]}
teachers:
  - name: math
    path: {models["moe"]}
data:
  train_files: [x.parquet]
{extra}
"""


def errors(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides).validate()
    return str(e.value)


def test_valid_config_and_overrides(tmp_path: Path, models: dict[str, str]) -> None:
    p = write(tmp_path, base_yaml(models, "objective:\n  name: exopd\n"))
    cfg = load_config(p, ["objective.lambda=1.5", "student.parallel.tensor_model_parallel_size=2", "trainer.steps=7"])
    cfg.validate()
    assert objective_class("exopd").lam(cfg.objective) == 1.5 and cfg.trainer.steps == 7
    assert cfg.student.parallel.tensor_model_parallel_size == 2
    # YAML round trip keeps the user-facing spelling of `lambda`
    assert "lambda: 1.5" in to_yaml(cfg)
    assert objective_class("exopd").lam(load_config(p).objective) == 1.25  # ExOPD's paper default


def test_base_files_are_merged(tmp_path: Path, models: dict[str, str]) -> None:
    (tmp_path / "preset.yaml").write_text("trainer:\n  steps: 3\n  save_every: 1\n")
    p = write(tmp_path, "base: preset.yaml\n" + base_yaml(models, "trainer:\n  steps: 5\n"))
    cfg = load_config(p)
    assert (cfg.trainer.steps, cfg.trainer.save_every) == (5, 1)


def test_unknown_key_suggests(tmp_path: Path, models: dict[str, str]) -> None:
    msg = errors(write(tmp_path, base_yaml(models, "trainer:\n  stepz: 3\n")))
    assert "trainer.stepz" in msg and "steps" in msg
    msg = errors(write(tmp_path, base_yaml(models)), ["objective.lamda=1.2"])
    assert "objective.lamda" in msg and "lambda" in msg


def test_wrong_type(tmp_path: Path, models: dict[str, str]) -> None:
    msg = errors(write(tmp_path, base_yaml(models)), ["trainer.steps=many"])
    assert "trainer.steps" in msg and "many" in msg


def test_malformed_yaml(tmp_path: Path) -> None:
    msg = errors(write(tmp_path, "student:\n  path: [unclosed\n"))
    assert "malformed YAML" in msg and "line" in msg


def test_override_syntax(tmp_path: Path, models: dict[str, str]) -> None:
    assert "key=value" in errors(write(tmp_path, base_yaml(models)), ["trainer.steps"])
    assert "teachers.3" in errors(write(tmp_path, base_yaml(models)), ["teachers.3.path=/x"])


@pytest.mark.parametrize(
    "override, key, text",
    [
        (
            "student.parallel.tensor_model_parallel_size=3",
            "student.parallel.tensor_model_parallel_size",
            "num_query_groups=4",
        ),
        (
            "student.parallel.pipeline_model_parallel_size=3",
            "student.parallel.pipeline_model_parallel_size",
            "num_hidden_layers=4",
        ),
        ("student.parallel.expert_model_parallel_size=2", "student.parallel.expert_model_parallel_size", "dense"),
        (
            "teachers.0.parallel.expert_model_parallel_size=2",
            "teachers.0.parallel.expert_model_parallel_size",
            "EP x ETP",
        ),
        (
            "teachers.0.parallel.expert_model_parallel_size=3",
            "teachers.0.parallel.expert_model_parallel_size",
            "num_experts=4",
        ),
    ],
)
def test_indivisible_parallel_sizes(tmp_path: Path, models: dict[str, str], override: str, key: str, text: str) -> None:
    msg = errors(write(tmp_path, base_yaml(models)), [override])
    assert key in msg and text in msg


def test_missing_model_path(tmp_path: Path, models: dict[str, str]) -> None:
    msg = errors(write(tmp_path, base_yaml(models)), ["student.path=/no/such/model"])
    assert "student.path" in msg and "does not exist" in msg
    msg = errors(write(tmp_path, base_yaml(models)), ["student.path="])
    assert "student.path" in msg


def test_teacher_vocab_mismatch(tmp_path: Path, models: dict[str, str]) -> None:
    msg = errors(write(tmp_path, base_yaml(models)), [f"teachers.0.path={models['other_vocab']}"])
    assert "teachers.0.path" in msg and "vocab_size" in msg


def test_non_qwen3_model(tmp_path: Path, models: dict[str, str]) -> None:
    from transformers import LlamaConfig

    d = tmp_path / "llama"
    d.mkdir()
    LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(d)
    msg = errors(write(tmp_path, base_yaml(models)), [f"student.path={d}"])
    assert "student.path" in msg and "llama" in msg


def test_objective_needs_teacher_and_bad_choice(tmp_path: Path, models: dict[str, str]) -> None:
    p = write(tmp_path, f"student:\n  path: {models['dense']}\ndata:\n  train_files: [x.parquet]\n")
    assert "teachers" in errors(p)
    assert "the teacher writes the responses" in errors(p, ["objective.name=sft"])  # SeqKD needs one too
    assert "objective.name" in errors(write(tmp_path, base_yaml(models)), ["objective.name=ppo"])
    assert "rollout.top_p" in errors(write(tmp_path, base_yaml(models)), ["rollout.top_p=1.5"])


def test_fusion_and_fused_lm_head(tmp_path: Path, models: dict[str, str]) -> None:
    """``<model>.fusion`` takes auto / true / false (YAML booleans too) and names the key otherwise;
    ``trainer.fused_lm_head`` is on unless switched off."""
    p = write(tmp_path, base_yaml(models))
    cfg = load_config(p)
    assert cfg.student.fusion_enabled is None and cfg.trainer.fused_lm_head is True
    cfg = load_config(p, ["student.fusion=false", "teachers.0.fusion=true", "trainer.fused_lm_head=false"])
    cfg.validate()
    assert (cfg.student.fusion_enabled, cfg.teachers[0].fusion_enabled, cfg.trainer.fused_lm_head) == (
        False,
        True,
        False,
    )
    msg = errors(p, ["teachers.0.fusion=fast"])
    assert "teachers.0.fusion" in msg and "auto, true, false" in msg


def test_teachers_base_model_keeps_the_teachers_settings() -> None:
    """The reference for reward correction runs as the teacher does (dtype, spec, fusion, offload when idle),
    on ``base_path`` and ``base_parallel`` (the teacher's layout when unset)."""
    layout = ParallelConfig(tensor_model_parallel_size=2)
    teacher = TeacherConfig(
        path="/t", dtype="bf16", spec="local", fusion="false", offload_when_idle=True, name="math", base_path="/b"
    )
    base = teacher.base_model
    assert type(base) is ModelConfig
    assert (base.path, base.dtype, base.spec, base.fusion, base.offload_when_idle) == (
        "/b",
        "bf16",
        "local",
        "false",
        True,
    )
    assert base.parallel == teacher.parallel
    assert dataclasses.replace(teacher, base_parallel=layout).base_model.parallel == layout
