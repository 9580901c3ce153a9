"""The comparison's aggregation and outputs: spread over seeds, failed runs left out, gap closed, the table's
rows, the curves' common steps, the PNG."""

from __future__ import annotations

import statistics
from pathlib import Path

from megatron_opd.compare import report
from megatron_opd.compare.runs import gap_closed
from tests.tolerance import float64_approx


def _run(name: str, seed: int, acc: float, kl: float, steps: list[float]) -> dict:
    return {
        "objective": name,
        "seed": seed,
        "accuracy": acc,
        "gap_closed": gap_closed(0.1, acc, 1.0),
        "reverse_kl": kl,
        "eval_curve": {"step": steps, "accuracy": [0.1] * (len(steps) - 1) + [acc]},
        "train_curves": {"teacher/reverse_kl": {"step": [1.0, 2.0], "value": [0.9, kl]}} if name != "sft" else {},
    }


def _results() -> dict:
    runs = [
        _run("opd", 1, 0.8, 0.2, [0, 10, 20]),
        _run("opd", 2, 0.7, 0.3, [0, 10, 20]),
        _run("opd", 3, 0.9, 0.1, [0, 5, 10, 20]),
        _run("sft", 1, 0.5, 0.6, [0, 10, 20]),
        {"objective": "sft", "seed": 2, "error": "opd train exited 1: boom"},
    ]
    return {
        "objectives": ["opd", "sft"],
        "seeds": [1, 2, 3],
        "runs": runs,
        "summary": report.summarize(runs, ["opd", "sft"]),
        "student_before": {"accuracy": 0.1, "reverse_kl": 1.2},
        "teacher": {"accuracy": 1.0},
    }


def test_gap_closed() -> None:
    assert gap_closed(0.1, 0.55, 1.0) == float64_approx(0.5, 1.0, 4)  # decimal inputs, 3 operations on numbers ≤ 1
    assert gap_closed(1.0, 0.9, 1.0) is None  # nothing to close


def test_summary_spread_over_seeds_without_failed_runs() -> None:
    summary = _results()["summary"]
    acc = summary["opd"]["accuracy"]
    # float64 statistics of numbers ≤ 1 against the decimal values and other orders: a few roundings of 1
    assert acc["mean"] == float64_approx(0.8, 1.0, 4)
    assert acc["std"] == float64_approx(statistics.stdev([0.8, 0.7, 0.9]), 1.0, 8)
    assert (acc["min"], acc["max"], acc["n"]) == (0.7, 0.9, 3)
    assert summary["opd"]["gap_closed"]["mean"] == float64_approx((0.8 - 0.1) / 0.9, 1.0, 8)
    assert summary["sft"]["accuracy"] == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}


def test_markdown_table_rows() -> None:
    lines = report.markdown_table(_results()).splitlines()
    assert lines[0].startswith("| objective | held-out accuracy | gap closed | reverse KL")
    opd = next(line for line in lines if line.startswith("| `opd`"))
    assert "0.800 ± 0.100 (0.700–0.900)" in opd and opd.endswith("| 3/3 |")
    sft = next(line for line in lines if line.startswith("| `sft`"))
    assert "| 0.500 |" in sft and sft.endswith("| 1/3 |")  # one seed finished, one failed, one never ran
    assert lines[-2].startswith("| student before | 0.100") and lines[-1].startswith("| teacher | 1.000")


def test_band_uses_the_steps_every_run_has() -> None:
    steps, mean, low, high = report._band([[0, 5, 10], [0, 10], [0, 10, 20]], [[1, 2, 3], [3, 5], [2, 4, 9]])
    assert steps == [0, 10] and mean == [2, 4] and low == [1, 3] and high == [3, 5]


def test_outputs_written(tmp_path: Path) -> None:
    import json

    results = _results()
    report.write_outputs(results, tmp_path / "r.json", tmp_path / "r.md", tmp_path / "c.png")
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["opd"]["accuracy"]["n"] == 3
    assert (tmp_path / "r.md").read_text() == report.markdown_table(results)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
