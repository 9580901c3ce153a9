"""The comparison's outputs: the spread over seeds per objective, a markdown table, the JSON record and a
PNG of the curves (held-out accuracy by step, the sampled-token reverse KL during training, the final
held-out reverse KL)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

# run-record key -> column title
COLUMNS = {
    "accuracy": "held-out accuracy",
    "gap_closed": "gap closed",
    "reverse_kl": "reverse KL to teacher (nat/token)",
}


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(records: list[dict[str, Any]], objectives: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per objective and column, the spread over its finished runs (failed runs and missing values left out)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in objectives:
        done = [r for r in records if r["objective"] == name and "error" not in r]
        out[name] = {}
        for key in COLUMNS:
            values = [float(r[key]) for r in done if r.get(key) is not None and math.isfinite(float(r[key]))]
            if values:
                out[name][key] = spread(values)
    return out


def _cell(s: dict[str, float] | None, digits: int = 3) -> str:
    if not s:
        return "–"
    text = f"{s['mean']:.{digits}f}"
    if s["n"] > 1:
        text += f" ± {s['std']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
    return text


def markdown_table(results: dict[str, Any]) -> str:
    """The table: one row per objective (mean ± sample std (min–max) over seeds), then the references."""
    seeds = len(results["seeds"])
    lines = [
        f"| objective | {' | '.join(COLUMNS.values())} | runs |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name in results["objectives"]:
        row = results["summary"].get(name, {})
        runs = max((s["n"] for s in row.values()), default=0)
        lines.append(f"| `{name}` | {' | '.join(_cell(row.get(k)) for k in COLUMNS)} | {runs}/{seeds} |")
    before, teacher = results["student_before"], results["teacher"]
    lines.append(f"| student before | {before['accuracy']:.3f} | 0 | {before['reverse_kl']:.3f} | |")
    lines.append(f"| teacher | {teacher['accuracy']:.3f} | 1 | 0 | |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Three panels: held-out accuracy by step (mean over seeds, min–max band; the teacher dashed), the
    sampled-token reverse KL of the training rollouts by step, the final held-out reverse KL per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax, bar_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    done = [r for r in results["runs"] if "error" not in r]
    colors = {name: f"C{i % 10}" for i, name in enumerate(results["objectives"])}
    for name in results["objectives"]:
        runs = [r for r in done if r["objective"] == name]
        if not runs:
            continue
        steps, mean, low, high = _band(
            [r["eval_curve"]["step"] for r in runs], [r["eval_curve"]["accuracy"] for r in runs]
        )
        acc_ax.plot(steps, mean, marker="o", color=colors[name], label=name)
        acc_ax.fill_between(steps, low, high, color=colors[name], alpha=0.15)
        kl = [r["train_curves"]["teacher/reverse_kl"] for r in runs if "teacher/reverse_kl" in r["train_curves"]]
        if kl:
            k_steps, k_mean, _, _ = _band([c["step"] for c in kl], [c["value"] for c in kl])
            kl_ax.plot(k_steps, k_mean, color=colors[name], label=name)
    acc_ax.axhline(results["teacher"]["accuracy"], color="black", linestyle="--", linewidth=1, label="teacher")
    acc_ax.set(title="held-out accuracy (greedy)", xlabel="step", ylim=(0, 1.05))
    kl_ax.set(title="sampled-token reverse KL, training rollouts", xlabel="step", ylabel="nat/token")
    names = [n for n in results["objectives"] if "reverse_kl" in results["summary"].get(n, {})]
    stats = [results["summary"][n]["reverse_kl"] for n in names]
    bar_ax.bar(
        names, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3, color=[colors[n] for n in names]
    )
    bar_ax.axhline(results["student_before"]["reverse_kl"], color="gray", linestyle=":", label="student before")
    bar_ax.set(title="held-out reverse KL to the teacher (exact)", ylabel="nat/token")
    for ax in (acc_ax, kl_ax, bar_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _band(steps: list[list[float]], values: list[list[float]]) -> tuple[list[float], ...]:
    """Mean, min and max over runs at the steps every run has."""
    common = sorted(set(steps[0]).intersection(*map(set, steps[1:])))
    at = [dict(zip(s, v)) for s, v in zip(steps, values)]
    columns = [[a[x] for a in at] for x in common]
    return common, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def write_outputs(results: dict[str, Any], json_path: Path, markdown_path: Path, png_path: Path) -> None:
    """The JSON record, the markdown table and the PNG."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown_table(results))
    plot_curves(results, png_path)
