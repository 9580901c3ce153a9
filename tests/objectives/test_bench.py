"""``opd bench objectives`` runs end to end on a small case and writes its JSON records."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_opd.bench.objectives import main


def test_bench_objectives_small(tmp_path: Path) -> None:
    out = tmp_path / "objectives.json"
    argv = ["--device", "cpu", "--tokens", "64", "--vocab", "4000", "--top-k", "8", "--objectives", "opd,aopd,sft"]
    assert main([*argv, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["objective"], r["impl"]) for r in records] == [
        (o, i) for o in ("opd", "aopd", "sft") for i in ("reference", "ours")
    ]
    by = {(r["objective"], r["impl"]): r for r in records}
    for objective in ("opd", "aopd", "sft"):
        ours, reference = by[objective, "ours"], by[objective, "reference"]
        grad_bytes = 64 * 4000 * 2  # bf16 logits gradient
        assert grad_bytes <= ours["peak_mem_bytes"] < reference["peak_mem_bytes"]
        assert ours["time_ms"] > 0
    assert by["aopd", "reference"]["input_bytes"] > 64 * 4000 * 2 > by["aopd", "ours"]["input_bytes"]
