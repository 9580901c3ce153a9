"""Per-step metrics: ``RUN_DIR/metrics.jsonl`` (always), TensorBoard and W&B (when configured),
and a one-line console summary per step."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from megatron_opd.config.schema import LoggingConfig


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, run_config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from e
            self._wandb = wandb.init(
                project=cfg.wandb_project, name=cfg.wandb_run_name, config=run_config, dir=str(run_dir)
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._tb is not None:
            for k, v in numeric.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run redoes them)."""
        if self.path.is_file():
            keep = [
                line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_line(step: int, total: int, m: dict[str, Any]) -> str:
    keys = [
        ("loss", "train/loss"),
        ("rKL", "teacher/reverse_kl"),
        ("H", "student/entropy"),
        ("len", "rollout/response_len"),
        ("reward", "rollout/reward"),
        ("tok/s", "perf/tokens_per_s"),
    ]
    parts = [f"step {step}/{total}"]
    for short, key in keys:
        if key in m and isinstance(m[key], (int, float)):
            parts.append(f"{short} {m[key]:.4g}")
    return "  ".join(parts)
