"""``opd plot`` draws a run's curves; every shipped config loads, and the paper configs validate
against the real Qwen3 shapes (configs/models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_opd.config import load_config
from megatron_opd.objectives.registry import objective_class
from megatron_opd.trainer.plot import plot_run
from tests.conftest import REPO

MODELS = REPO / "configs" / "models"
# paper config -> model preset of the student and of each teacher (shapes only)
PAPER = {
    "exopd_qwen3_1p7b_from_30b_a3b.yaml": ("Qwen3-1.7B", ["Qwen3-30B-A3B-Instruct-2507"]),
    "exopd_qwen3_1p7b_from_30b_a3b_2node.yaml": ("Qwen3-1.7B", ["Qwen3-30B-A3B-Instruct-2507"]),
    "exopd_reward_correction.yaml": ("Qwen3-1.7B", ["Qwen3-4B"]),
    "exopd_qwen3_4b_multi_teacher.yaml": ("Qwen3-4B", ["Qwen3-4B", "Qwen3-4B"]),
    "aopd_qwen3_8b_from_32b.yaml": ("Qwen3-8B", ["Qwen3-32B"]),
    "lsm_qwen3_8b_from_32b.yaml": ("Qwen3-8B", ["Qwen3-32B"]),
}


def test_plot_writes_one_png_per_metric_group(tmp_path: Path) -> None:
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(
                json.dumps(
                    {"step": step, "time": 0.0, "train/loss": 1.0 / step, "train/lr": 1e-5, "eval/accuracy": 0.1 * step}
                )
                + "\n"
            )
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["eval.png", "train.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    with pytest.raises(FileNotFoundError, match="no metrics"):
        plot_run(tmp_path / "empty")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_validate_at_the_real_shapes(name: str, tmp_path: Path) -> None:
    student, teachers = PAPER[name]
    overrides = [f"student.path={MODELS / student}", f"data.train_files=[{tmp_path / 'train.parquet'}]"]
    overrides += [f"teachers.{i}.path={MODELS / t}" for i, t in enumerate(teachers)]
    cfg = load_config(REPO / "configs" / "paper" / name, overrides)
    if cfg.objective.reference == "teacher_base":
        overrides += [f"teachers.{i}.base_path={MODELS / t}" for i, t in enumerate(teachers)]
        cfg = load_config(REPO / "configs" / "paper" / name, overrides)
    cfg.validate()
    assert cfg.optim.lr > 0 and cfg.rollout.engine == "sglang"


def test_demo_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "demo" / "cpu.yaml")
    assert (
        cfg.student.path == f"{cfg.demo_assets}/student"
        and objective_class(cfg.objective.name).lam(cfg.objective) == 1.25
    )


GOPD_CONFIGS = [
    "exopd_qwen3_1p7b_from_30b_a3b.yaml",
    "exopd_qwen3_1p7b_from_30b_a3b_2node.yaml",
    "exopd_reward_correction.yaml",
    "exopd_qwen3_4b_multi_teacher.yaml",
]


@pytest.mark.parametrize("name", GOPD_CONFIGS)
def test_gopd_configs_run_what_the_authors_ran(name: str) -> None:
    """The settings of RUCBM/G-OPD's scripts (verl/examples/g_opd/*.sh @37371a4) and verl's actor defaults."""
    cfg = load_config(REPO / "configs" / "paper" / name)
    o, d, r, opt = cfg.objective, cfg.data, cfg.rollout, cfg.optim
    assert (o.name, objective_class(o.name).lam(o), o.reference in ("student_base", "teacher_base")) == (
        "exopd",
        1.25,
        True,
    )
    assert o.loss_agg_mode == "seq-mean-token-mean"  # micro-batches of one sequence, token-mean in each
    assert o.advantage_logp == "student" and cfg.trainer.mini_batches_per_step == 1  # on-policy: sg(ℓ_S)
    assert (o.rollout_is, o.rollout_is_threshold, o.rollout_rs) == ("token", 5.0, "none")
    assert (d.train_batch_size, d.max_prompt_length, d.enable_thinking, d.filter_overlong_prompts) == (
        1024,
        2048,
        False,
        True,
    )
    assert (d.truncation, d.shuffle, d.seed) == ("error", True, 42)
    assert (r.n, r.temperature, r.top_p, r.max_new_tokens) == (1, 1.0, 1.0, 16384)
    assert (opt.lr, opt.weight_decay, opt.clip_grad, opt.warmup_steps, opt.lr_decay_style) == (
        1e-5,
        0.01,
        1.0,
        0,
        "constant",
    )
    assert (opt.adam_beta1, opt.adam_beta2) == (0.9, 0.999)
    assert cfg.trainer.steps == (50 if "multi_teacher" in name else 100)  # the paper's App. B
