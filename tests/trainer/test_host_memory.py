"""``opd check`` estimates the host memory per node at checkpoints for every paper config.

Parameter counts are checked against transformers' models of the shipped shapes (built on the meta
device); the per-node bytes of two layouts are worked out here by hand from the rules in
``megatron_opd/trainer/host_memory.py``'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_opd.config import load_config
from megatron_opd.config.check import main as opd_check
from megatron_opd.trainer.host_memory import checkpoint_host_memory, parameter_count
from tests.conftest import REPO
from tests.unit.test_plot_and_configs import MODELS, PAPER


def _hf(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(MODELS / name)


@pytest.mark.parametrize("name", sorted({m for s, ts in PAPER.values() for m in (s, *ts)}))
def test_parameter_count_is_transformers(name: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf(name))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert parameter_count(_hf(name)) == (total, experts)


def _overrides(name: str, tmp_path: Path) -> list[str]:
    student, teachers = PAPER[name]
    out = [f"student.path={MODELS / student}", f"data.train_files=[{tmp_path / 'train.parquet'}]"]
    out += [f"teachers.{i}.path={MODELS / t}" for i, t in enumerate(teachers)]
    if "reward_correction" in name:
        out += [f"teachers.{i}.base_path={MODELS / t}" for i, t in enumerate(teachers)]
    return out


@pytest.mark.parametrize("name", sorted(PAPER))
def test_opd_check_prints_the_estimate(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert opd_check([str(REPO / "configs" / "paper" / name), *_overrides(name, tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("# host memory per node at a checkpoint (8 GPUs per node")
    assert lines[-2].startswith("#   save: ") and lines[-1].startswith("#   resume: ")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def test_8b_student_tp2_dp4_with_a_32b_teacher(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One node: student ranks 0-7 (TP=2, DP=4: ranks 0 and 1 are DP rank 0), teacher 32B at TP=4 x
    DP=2 offloaded on the same GPUs."""
    name = "aopd_qwen3_8b_from_32b.yaml"
    student, _ = parameter_count(_hf("Qwen3-8B"))
    teacher, _ = parameter_count(_hf("Qwen3-32B"))
    offloaded = 8 * 2 * (teacher // 4)  # bf16 weights of 8 teacher ranks
    save = 2 * (12 + 2) * (student // 2) + offloaded
    resume = 8 * 12 * (student // 2) + offloaded
    assert resume - offloaded > 350 * 2**30  # every rank holds 12 bytes per parameter of its half (8B)
    opd_check([str(REPO / "configs" / "paper" / name), *_overrides(name, tmp_path), "--gpus-per-node", "8"])
    lines = capsys.readouterr().out.splitlines()[-2:]
    assert lines == [
        f"#   save:   {_gib(save)} on node 0 (idle groups offloaded: {_gib(offloaded)})",
        f"#   resume: {_gib(resume)} on node 0 (idle groups offloaded: {_gib(offloaded)})",
    ]


def test_two_nodes_only_dp_rank_0_gathers(tmp_path: Path) -> None:
    """1.7B at DP=16 over two nodes: the optimizer state is gathered on rank 0 (node 0) alone; the MoE
    teacher at EP=8 keeps, per rank, its non-expert weights and 1/8 of the experts."""
    name = "exopd_qwen3_1p7b_from_30b_a3b_2node.yaml"
    cfg = load_config(REPO / "configs" / "paper" / name, _overrides(name, tmp_path))
    per_node = checkpoint_host_memory(cfg, cfg.validate(), gpus_per_node=8)
    student, _ = parameter_count(_hf("Qwen3-1.7B"))
    total, experts = parameter_count(_hf("Qwen3-30B-A3B-Instruct-2507"))
    offloaded = 8 * 2 * ((total - experts) + experts // 8) + 8 * 2 * student  # teacher, reference (student_base)
    assert [(m.node, m.offloaded) for m in per_node] == [(0, offloaded), (1, offloaded)]
    assert [m.save for m in per_node] == [14 * student + offloaded, offloaded]
    assert [m.resume for m in per_node] == [8 * 12 * student + offloaded] * 2


def test_teachers_base_is_offloaded_like_its_teacher(tmp_path: Path) -> None:
    """Reward correction: the teacher's pre-RL base is a group of its own with the teacher's settings, so with
    the teacher offloaded when idle (colocated, one node) the base is too: both 4B models' bf16 weights are in
    host memory at a checkpoint, beside the student's optimizer state."""
    name = "exopd_reward_correction.yaml"
    cfg = load_config(REPO / "configs" / "paper" / name, _overrides(name, tmp_path))
    assert cfg.trainer.colocate and cfg.teachers[0].offload_when_idle
    (node,) = checkpoint_host_memory(cfg, cfg.validate(), gpus_per_node=8)
    student, _ = parameter_count(_hf("Qwen3-1.7B"))
    teacher, _ = parameter_count(_hf("Qwen3-4B"))
    assert node.offloaded == 2 * (8 * 2 * teacher)  # teacher and its base, DP = 8, bf16
    assert node.save == 14 * student + node.offloaded
