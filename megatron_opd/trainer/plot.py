"""``opd plot RUN_DIR``: PNG curves of a run's ``metrics.jsonl`` (one file per metric group)."""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from megatron_opd.trainer.metrics import read_metrics


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric prefix (``train``, ``teacher``, ``rollout``, ``eval``, ...) under
    ``out_dir`` (default ``RUN_DIR/plots``); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl records to plot")
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for k, v in r.items():
            if k in ("step", "time") or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            series[k.split("/", 1)[0] if "/" in k else "misc"][k].append((r["step"], float(v)))
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group, metrics in sorted(series.items()):
        n = len(metrics)
        cols = min(3, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
        for ax, (name, points) in zip(axes.flat, sorted(metrics.items())):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"{group}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="opd plot", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
