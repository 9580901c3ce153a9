"""``opd compare``: every objective's run config is the demo config with only the objective changed (and
validates), and a reduced comparison (one seed, two steps, two objectives) writes its table, JSON and PNG,
then resumes from its finished runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.compare.runs import OBJECTIVE_OVERRIDES, plan_runs
from megatron_opd.config.loader import load_config
from megatron_opd.objectives.registry import OBJECTIVE_NAMES, objective_class
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo" / "cpu.yaml")


def test_every_objective_is_planned_and_validates(demo_assets: object, tmp_path: Path) -> None:
    assert set(OBJECTIVE_OVERRIDES) == set(OBJECTIVE_NAMES)
    plan = plan_runs(list(OBJECTIVE_NAMES), [4, 5], tmp_path, ["trainer.steps=3"], top_k=6)
    assert [(p.objective, p.seed) for p in plan[:8]] == [*((n, 4) for n in OBJECTIVE_NAMES), ("opd", 5)]
    base = load_config(DEMO)
    lam = {"opd": 1.0, "gopd": 0.5, "exopd": 1.25}
    for spec in plan:
        cfg = load_config(DEMO, list(spec.overrides))
        cfg.validate()
        assert cfg.objective.name == spec.objective and objective_class(spec.objective).lam(cfg.objective) == lam.get(
            spec.objective, 1.0
        )
        assert cfg.objective.top_k == 6 and cfg.seed == spec.seed and cfg.data.seed == spec.seed
        assert cfg.run_dir == str(tmp_path / spec.objective / f"seed_{spec.seed}") and cfg.trainer.steps == 3
        # the same task, budget, rollouts and evaluation for every objective
        assert (cfg.data, cfg.rollout, cfg.optim, cfg.eval) == (
            base.data.__class__(**{**vars(base.data), "seed": spec.seed}),
            base.rollout,
            base.optim,
            base.eval,
        )


def test_bad_arguments_are_named(demo_assets: object, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from megatron_opd.compare.cli import main

    for bad in (["--seeds", "0"], ["--objectives", "opd,ppo"], ["--top-k", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([DEMO, *bad, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
    assert main([DEMO, "eval.files=[]", "--out", str(tmp_path)]) == 2
    assert "eval.files" in capsys.readouterr().err
    assert main([DEMO, "--objectives", "aopd", "--top-k", "57", "--out", str(tmp_path)]) == 2  # K > vocab 56
    assert "objective.top_k" in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_reduced_comparison(demo_assets: object, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    command = [
        sys.executable,
        "-m",
        "megatron_opd",
        "compare",
        DEMO,
        "--objectives",
        "opd,sft",
        "--seeds",
        "1",
        "trainer.steps=2",
        "trainer.eval_every=1",
        "eval.max_problems=32",
        "--out",
        str(out),
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["budget"] == {"steps": 2, "train_batch_size": 128, "rollout_n": 1, "samples_per_run": 256}
    assert [(r["objective"], r["seed"]) for r in results["runs"]] == [("opd", 1), ("sft", 1)]
    for r in results["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["teacher_accuracy"] == 1.0 and r["reverse_kl"] > 0
        assert (
            r["eval_curve"]["step"] == [0.0, 1.0, 2.0] and r["accuracy_before"] == results["student_before"]["accuracy"]
        )
    assert "teacher/reverse_kl" in results["runs"][0]["train_curves"]  # on-policy runs score their samples
    assert results["summary"]["opd"]["accuracy"]["n"] == 1 and results["student_before"]["reverse_kl"] > 0
    table = (out / "results.md").read_text()
    assert "| `opd` |" in table and "| `sft` |" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    logs = {p: p.stat().st_mtime for p in out.glob("*/seed_1/train.log")}
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in logs} == logs  # finished runs are reused, not retrained
