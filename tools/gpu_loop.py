#!/usr/bin/env python
"""The whole OPD loop at real shapes, with random weights, on one GPU: a Qwen3-1.7B student and a
Qwen3-30B-A3B teacher cut to its first ``--teacher-layers`` layers (the shapes of the paper config
``configs/paper/exopd_qwen3_1p7b_from_30b_a3b.yaml``), ExOPD with the student's initial weights as
reference, every group colocated on the GPU and offloaded while idle, the embedded rollout engine,
``--prompts`` responses of ``--response-tokens`` tokens per step packed into micro-batches of
``--max-tokens-per-microbatch`` (8,192) tokens, a checkpoint after every step.

Writes ``--results`` (JSON): per step the time of each phase (rollout, score, train, sync from the
run's ``metrics.jsonl``; checkpoint from the gap between one step's metrics and the next step's
start, the last one from the checkpoint tracker file) and the peak memory sampled while the run
went: the GPU's (``nvidia-smi``, all processes) and the host's (resident memory of the process tree).
Prints the same as a Markdown table (docs/benchmarks.md).

    python tools/gpu_loop.py --work-dir /tmp/loop --results bench/results/loop_h200.json
    python tools/gpu_loop.py --tiny ...   # tiny models on CPU: the same path in a couple of minutes

Prompts and the (character-level) tokenizer are the CPU demo's (``.cache/opd_demo``, built if absent):
with random weights the responses are random tokens and every one runs to ``--response-tokens``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_ASSETS = REPO / ".cache" / "opd_demo"
STUDENT_CONFIG = REPO / "configs" / "models" / "Qwen3-1.7B" / "config.json"
TEACHER_CONFIG = REPO / "configs" / "models" / "Qwen3-30B-A3B-Instruct-2507" / "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PHASES = ("rollout", "score", "train", "sync", "checkpoint")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="models, data and the run go here")
    p.add_argument("--results", required=True, help="the JSON record")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32, help="prompts (= responses) per step")
    p.add_argument("--response-tokens", type=int, default=512)
    p.add_argument("--max-tokens-per-microbatch", type=int, default=8192)
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU): the same path, quickly")
    return p.parse_args(argv)


def model_configs(args: argparse.Namespace) -> dict[str, Any]:
    """HF configs of the student and the cut teacher (tiny ones with ``--tiny``)."""
    from transformers import AutoConfig

    from megatron_opd.models.tiny import tiny_config

    if args.tiny:
        return {"student": tiny_config(vocab_size=512), "teacher": tiny_config(moe=True, vocab_size=512)}
    student = AutoConfig.from_pretrained(STUDENT_CONFIG.parent)
    teacher = AutoConfig.from_pretrained(TEACHER_CONFIG.parent)
    teacher.num_hidden_layers = args.teacher_layers
    teacher.mlp_only_layers = [i for i in (teacher.mlp_only_layers or []) if i < args.teacher_layers]
    return {"student": student, "teacher": teacher}


def save_random_model(config: Any, out: Path, tokenizer_dir: Path) -> None:
    """Random weights (the model's own init), bf16, built on the GPU where there is one; the demo's
    tokenizer beside them."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").is_file():
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(str(out))
    del model
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)


def run_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return {
        "run_dir": str(work / "run"),
        "seed": 1,
        "resume": "never",
        "student": {"path": str(work / "student"), "offload_when_idle": True},
        "teachers": [{"name": "math", "path": str(work / "teacher"), "offload_when_idle": True}],
        "objective": {"name": "exopd", "lambda": 1.25, "reference": "student_base", "rollout_is": "token"},
        "data": {
            "train_files": [str(DEMO_ASSETS / "data" / "train.parquet")],
            "train_batch_size": args.prompts,
            "max_prompt_length": 32,
            "enable_thinking": False,
        },
        "rollout": {
            "engine": "hf",
            "max_new_tokens": args.response_tokens,
            "batch_size": args.prompts,
            "offload_when_idle": True,
        },
        "optim": {"lr": 1.0e-5, "clip_grad": 1.0, "lr_decay_style": "constant"},
        "trainer": {
            "steps": args.steps,
            "save_every": 1,
            "keep_last": 1,
            "eval_before": False,
            "colocate": True,
            "max_tokens_per_microbatch": args.max_tokens_per_microbatch,
        },
        "logging": {"progress_bar": False, "tensorboard": False},
    }


class MemorySampler:
    """Peak memory while a run goes: the GPU's used memory (``nvidia-smi``) and the resident memory
    of this process's tree (Ray's workers included), every ``period_s``."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.gpu_peak_bytes: int | None = None
        self.host_peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.has_gpu = shutil.which("nvidia-smi") is not None

    def _gpu_used(self) -> int | None:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        values = [int(v) for v in out.stdout.split()] if out.returncode == 0 else []
        return sum(values) * 2**20 if values else None

    def _host_used(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.host_peak_bytes = max(self.host_peak_bytes, self._host_used())
            if self.has_gpu:
                used = self._gpu_used()
                if used is not None:
                    self.gpu_peak_bytes = max(self.gpu_peak_bytes or 0, used)
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def step_phases(run_dir: Path) -> list[dict[str, Any]]:
    """Per step: each phase's seconds, tokens, and the checkpoint time after it (see the module doc)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    steps = []
    for i, m in enumerate(lines):
        if i + 1 < len(lines):  # the next step began when this one's checkpoint was written
            checkpoint = lines[i + 1]["time"] - m["time"] - lines[i + 1]["time/step_s"]
        else:
            checkpoint = tracker.stat().st_mtime - m["time"]
        steps.append(
            {
                "step": m["step"],
                **{f"{p}_s": round(m[f"time/{p}_s"], 3) for p in PHASES if p != "checkpoint"},
                "checkpoint_s": round(checkpoint, 3),
                "tokens": int(m["perf/tokens"]),
                "train_loss": m.get("train/loss"),
            }
        )
    return steps


def versions() -> dict[str, str | None]:
    import importlib.metadata

    import torch

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("megatron-core", "transformers", "triton", "ray", "transformer-engine"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def markdown(record: dict[str, Any]) -> str:
    rows = ["| step | tokens | " + " | ".join(f"{p} s" for p in PHASES) + " |", "|---" * (len(PHASES) + 2) + "|"]
    for s in record["steps"]:
        rows.append(f"| {s['step']} | {s['tokens']} | " + " | ".join(f"{s[p + '_s']:.1f}" for p in PHASES) + " |")
    gib = [record[k] / 2**30 if record[k] is not None else None for k in ("gpu_peak_bytes", "host_peak_bytes")]
    rows.append("")
    rows.append(
        f"peak GPU memory {'-' if gib[0] is None else f'{gib[0]:.1f} GiB'}, peak host memory {gib[1]:.1f} GiB "
        f"({record['device']}; run wall {record['wall_s']:.0f} s)"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch

    from megatron_opd.demo.build import build_demo_assets

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    build_demo_assets(DEMO_ASSETS)
    t0 = time.perf_counter()
    configs = model_configs(args)
    for name, config in configs.items():
        save_random_model(config, work / name, DEMO_ASSETS / "student")
    setup_s = time.perf_counter() - t0
    cfg_path = work / "loop.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(args, work), sort_keys=False))
    shutil.rmtree(work / "run", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with MemorySampler() as memory:
        proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", str(cfg_path)], env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"opd train exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    record = {
        "bench": "gpu_loop",
        "device": device,
        "versions": versions(),
        "student": {"config": "tiny" if args.tiny else str(STUDENT_CONFIG.relative_to(REPO))},
        "teacher": {
            "config": "tiny" if args.tiny else str(TEACHER_CONFIG.relative_to(REPO)),
            "layers": configs["teacher"].num_hidden_layers,
        },
        "prompts_per_step": args.prompts,
        "response_tokens": args.response_tokens,
        "max_tokens_per_microbatch": args.max_tokens_per_microbatch,
        "model_setup_s": round(setup_s, 1),
        "wall_s": round(wall, 1),
        "gpu_peak_bytes": memory.gpu_peak_bytes,
        "host_peak_bytes": memory.host_peak_bytes,
        "steps": step_phases(work / "run"),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=1))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
