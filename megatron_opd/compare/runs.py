"""One ``opd train`` per (objective, seed), all from the same config: the same task, sample budget
(``data.train_batch_size × rollout.n × trainer.steps``), evaluation and seeds; only the objective differs.

Each run is a subprocess (``python -m megatron_opd train``) writing to ``OUT/<objective>/seed_<s>/``; its
final checkpoint is exported to Hugging Face format there and measured (:mod:`.heldout_kl`), and the run's
numbers are kept in ``compare.json`` beside it, so a comparison that was interrupted resumes where it
stopped. A run that fails is recorded with its error and the log's tail; the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_opd.config.schema import OPDConfig, model_hf_dir
from megatron_opd.trainer.metrics import read_metrics

# Per objective, the settings the comparison gives it on top of the config (the papers' defaults):
# λ = 1.25 for ExOPD, 0.5 (reward interpolation) for G-OPD; AOPD τ = 0, β = 0; LSM on the teacher top-K
# with special-token masking; GKD the forward KL on the teacher top-K; SFT = SeqKD on teacher-written
# responses. ``objective.lambda`` is reset where the objective has no λ. The support size comes from ``top_k``.
OBJECTIVE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "opd": ("objective.name=opd", "objective.lambda=null"),
    "gopd": ("objective.name=gopd", "objective.lambda=0.5"),
    "exopd": ("objective.name=exopd", "objective.lambda=1.25"),
    "aopd": ("objective.name=aopd", "objective.lambda=null", "objective.tau=0.0", "objective.beta=0.0"),
    "lsm": ("objective.name=lsm", "objective.lambda=null", "objective.special_token_mask=true"),
    "gkd": ("objective.name=gkd", "objective.lambda=null", "objective.beta=0.0"),
    "sft": ("objective.name=sft", "objective.lambda=null"),
}
RESULT_FILE = "compare.json"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison."""

    objective: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]  # everything after the config on the `opd train` command line


def plan_runs(
    objectives: list[str], seeds: list[int], out: Path, user_overrides: list[str], top_k: int
) -> list[RunSpec]:
    """The runs in execution order: seed by seed, so a shortened comparison still covers every objective.
    ``seed`` sets the run's seed and the data order (``data.seed``)."""
    runs = []
    for seed in seeds:
        for name in objectives:
            run_dir = out / name / f"seed_{seed}"
            overrides = (
                *user_overrides,
                *OBJECTIVE_OVERRIDES[name],
                f"objective.top_k={top_k}",
                f"seed={seed}",
                f"data.seed={seed}",
                f"run_dir={run_dir}",
                "logging.progress_bar=false",
            )
            runs.append(RunSpec(name, seed, run_dir, overrides))
    return runs


def eval_curve(run_dir: Path, summary: dict[str, Any]) -> dict[str, list[float]]:
    """Held-out accuracy by step: before training (step 0), every ``trainer.eval_every``, and after."""
    steps, accuracy = [0.0], [float(summary["eval_before"])]
    for record in read_metrics(run_dir):
        if isinstance(record.get("eval/accuracy"), (int, float)):
            steps.append(float(record["step"]))
            accuracy.append(float(record["eval/accuracy"]))
    steps.append(float(summary["steps"]))
    accuracy.append(float(summary["eval_after"]))
    return {"step": steps, "accuracy": accuracy}


def train_curves(run_dir: Path, keys: tuple[str, ...] = ("teacher/reverse_kl", "rollout/reward")) -> dict:
    """Per-step training metrics (``teacher/reverse_kl`` is the sampled-token estimate; SFT has none)."""
    records = read_metrics(run_dir)
    out: dict[str, dict[str, list[float]]] = {}
    for key in keys:
        points = [(float(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            out[key] = {"step": [p[0] for p in points], "value": [p[1] for p in points]}
    return out


def execute(spec: RunSpec, config: str, cfg: OPDConfig, log_tail: int = 4000) -> dict[str, Any]:
    """Train (unless a finished run is already there), export and measure; the run's result record."""
    done = spec.run_dir / RESULT_FILE
    if done.is_file():
        return json.loads(done.read_text())
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    log = spec.run_dir / "train.log"
    record: dict[str, Any] = {"objective": spec.objective, "seed": spec.seed, "run_dir": str(spec.run_dir)}
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_opd", "train", config, *spec.overrides], stdout=f, stderr=subprocess.STDOUT
        )
    summary_file = spec.run_dir / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        record["error"] = f"opd train exited {proc.returncode}: " + log.read_text()[-log_tail:]
        return record
    summary = json.loads(summary_file.read_text())
    record.update(measure(spec.run_dir, cfg, summary, seed=spec.seed))
    record["wall_s"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(record, indent=1))
    return record


def measure(run_dir: Path, cfg: OPDConfig, summary: dict[str, Any], seed: int) -> dict[str, Any]:
    """Accuracy, gap closed, the held-out reverse KL of the final student, and the curves."""
    from megatron_opd.convert.mcore_to_hf import convert_mcore_to_hf

    student_hf = run_dir / "student_hf"
    if not (student_hf / "config.json").is_file():
        convert_mcore_to_hf(run_dir / "checkpoints", student_hf, overwrite=True, progress=False)
    before, after, teacher = summary["eval_before"], summary["eval_after"], summary["teacher_eval"]
    return {
        "accuracy": after,
        "accuracy_before": before,
        "teacher_accuracy": teacher,
        "gap_closed": gap_closed(before, after, teacher),
        "reverse_kl": heldout_reverse_kl(cfg, student_hf, seed),
        "train_wall_s": summary["wall_s"],
        "eval_curve": eval_curve(run_dir, summary),
        "train_curves": train_curves(run_dir),
    }


def heldout_reverse_kl(cfg: OPDConfig, student_dir: str | Path, seed: int) -> float:
    """The reverse KL of ``student_dir`` to the config's (first) teacher on the first eval file, sampled at
    the rollout temperature and length."""
    from megatron_opd.compare.heldout_kl import reverse_kl_to_teacher

    return reverse_kl_to_teacher(
        student_dir,
        model_hf_dir(cfg.teachers[0].path),
        cfg.eval.files[0],
        temperature=cfg.rollout.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=seed,
        max_prompts=cfg.eval.max_problems,
    )


def gap_closed(before: float, after: float, teacher: float) -> float | None:
    """``(after − before) / (teacher − before)``; None when the student starts at the teacher's level."""
    return (after - before) / (teacher - before) if teacher > before else None
