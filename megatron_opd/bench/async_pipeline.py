"""``opd bench async CONFIG``: wall time per step and phase overlap of ``opd train`` at each
``trainer.max_staleness``, on the same samples, the engine in its own process.

Each run is ``opd train CONFIG`` as a subprocess with rollouts from a fresh ``opd serve`` process on the student
(``rollout.engine=sglang``; one request per rollout batch), no evaluation, ``trainer.colocate=false`` (the teachers
score a batch ahead in an asynchronous run). Runs alternate over the staleness values ``--repeats`` times, so a
machine whose load drifts weighs on each alike. Per run, from ``metrics.jsonl``: the wall time between consecutive
steps (step 1, the warm-up, left out), the phase times summed over those steps, and ``overlap`` = (Σ phases − Σ
wall) / Σ rollout: the share of the generation time hidden behind the learner (0 when the phases run one after
another).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from megatron_opd.bench.common import device_name, write_records
from megatron_opd.config.loader import load_config
from megatron_opd.config.schema import model_hf_dir
from megatron_opd.rollout.sglang.launcher import ServerCommand, ServerProcesses, find_free_ports
from megatron_opd.trainer.metrics import read_metrics

PHASES = ("rollout", "score", "train", "sync")


@dataclasses.dataclass
class AsyncRecord:
    max_staleness: int
    repeat: int
    steps: int  # steps measured (step 1 left out)
    wall_s_per_step: float
    phase_s_per_step: dict[str, float]  # mean over the measured steps; rollout runs beside the learner when k >= 1
    waits_s_per_step: dict[str, float]  # learner waiting for its batch, updates waiting for requests in flight
    overlap: float
    staleness_mean: float
    final_loss: float
    device: str
    command: str


def measure(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step means over steps 2.. of one run's metrics records (see the module docstring)."""
    records = sorted(metrics, key=lambda r: r["step"])
    measured = records[1:]
    if not measured:
        raise ValueError("a run needs at least 2 steps to measure (step 1 is the warm-up)")
    n = len(measured)
    wall = records[-1]["time"] - records[0]["time"]
    phases = {p: sum(r.get(f"time/{p}_s", 0.0) for r in measured) for p in PHASES}
    return {
        "steps": n,
        "wall_s_per_step": wall / n,
        "phase_s_per_step": {p: t / n for p, t in phases.items()},
        "waits_s_per_step": {
            key: sum(r.get(f"time/{key}_s", 0.0) for r in measured) / n
            for key in ("wait_rollout", "sync_wait", "rollout_bound_wait")
        },
        "overlap": (sum(phases.values()) - wall) / max(phases["rollout"], 1e-9),
        "staleness_mean": sum(r["async/staleness_mean"] for r in measured) / n,
        "final_loss": records[-1]["train/loss"],
    }


def run_once(config: str, overrides: list[str], k: int, run_dir: Path, log_dir: Path) -> tuple[list[dict], str]:
    """One ``opd train`` at ``trainer.max_staleness=k`` against a fresh ``opd serve`` of the student."""
    cfg = load_config(config, overrides)
    student = model_hf_dir(cfg.student.path)
    (port,) = find_free_ports("127.0.0.1", 0, 1)
    serve = [sys.executable, "-m", "megatron_opd", "serve", "--model-path", student, "--port", str(port)]
    serve += ["--batch-size", str(cfg.rollout.batch_size), "--enable-deterministic-inference"]
    server = ServerCommand(f"http://127.0.0.1:{port}", serve, {"OMP_NUM_THREADS": "1"}, f"serve_k{k}")
    train = [sys.executable, "-m", "megatron_opd", "train", config, *overrides]
    train += [
        "rollout.engine=sglang",
        f"rollout.sglang.urls=[{server.url}]",
        "eval.files=[]",
        "trainer.colocate=false",
        f"trainer.max_staleness={k}",
        "trainer.save_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]
    with ServerProcesses([server], log_dir).start(timeout_s=300):
        with open(log_dir / f"train_{run_dir.name}.log", "w") as log:
            subprocess.run([*train, f"run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT, check=True)
    command = " ".join(["opd", *train[3:]]).replace(server.url, "<opd serve of the student>")
    return read_metrics(run_dir), command


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opd bench async", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="an opd train config, e.g. configs/demo/cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. trainer.steps=8)")
    parser.add_argument("--staleness", default="0,1", help="comma-separated trainer.max_staleness values")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/async_cpu.json")
    parser.add_argument("--work-dir", default=None, help="run directories and logs (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="opd_bench_async_"))
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for repeat in range(args.repeats):
        for k in (int(v) for v in args.staleness.split(",")):
            run_dir = work / f"k{k}_r{repeat}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.time()
            metrics, command = run_once(args.config, args.overrides, k, run_dir, work)
            m = measure(metrics)
            records.append(
                AsyncRecord(
                    max_staleness=k, repeat=repeat, **m, device=device_name(torch.device("cpu")), command=command
                )
            )
            print(
                f"k={k} repeat {repeat}: {m['wall_s_per_step']:.2f} s/step, overlap {m['overlap']:.2f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    write_records(records, args.out)
    return 0
