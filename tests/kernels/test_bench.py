"""`opd bench kernels`: the CPU memory accounting is exact on known allocations, and a tiny matrix writes the
documented JSON records with the plain-torch baseline using more memory than ours."""

from __future__ import annotations

import json

import torch

from megatron_opd.bench.common import LiveTensorBytes
from megatron_opd.bench.kernels import (
    Record,
    floor_fraction,
    main,
    make_inputs,
    minimal_bytes,
    minimal_flops,
    target_lines,
)


def test_live_tensor_bytes_counts_new_storage_only() -> None:
    with LiveTensorBytes() as t:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        a.view(10, 100).add_(1)  # view + in place: nothing new
        c = a * 2  # 4000 B more: peak 8000
        del c
        d = torch.ones(500)  # 2000 B: live 6000
    assert t.peak == 8000 and t.live == 6000
    del a, d


def test_cli_writes_records(tmp_path, monkeypatch) -> None:
    from megatron_opd.kernels import torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 1 << 16)  # 16 rows per chunk: 8 chunks here
    out = tmp_path / "k.json"
    args = "--device cpu --threads 1 --n 128 --widths 4096 --k 8 --impls torch,ours --repeats 5 --warmup 1 --json"
    threads = torch.get_num_threads()
    try:
        rc = main([*args.split(), str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    records = json.loads(out.read_text())
    keys = {"op", "impl", "n", "v", "k", "tp", "time_ms", "peak_mem_bytes", "device", "roofline_fraction"}
    assert {(r["op"], r["impl"]) for r in records} == {
        (op, impl) for op in ("logprob_entropy", "topk_kl", "topk") for impl in ("torch", "ours")
    }
    for r in records:
        assert keys <= r.keys() and r["time_ms"] > 0 and r["peak_mem_bytes"] > 0 and r["device"].startswith("cpu")
        assert r["tp"] == 37 and r["k"] == (0 if r["op"] == "logprob_entropy" else 8)
    mem = {(r["op"], r["impl"]): r["peak_mem_bytes"] for r in records}
    grad_bytes = 128 * 4096 * 2
    # plain torch keeps fp32 N x V copies (log-probs, exp, gradient) alive; ours: the bf16 gradient + two fp32
    # chunks (x and exp(x), 256 KiB each here) and a bool mask of one + O(N·K)
    for op in ("logprob_entropy", "topk_kl"):
        assert mem[(op, "torch")] > 4 * mem[(op, "ours")]
        assert mem[(op, "ours")] < grad_bytes + (2 * 4 + 1) * (1 << 16) + 32 * 1024
    assert mem[("topk", "torch")] > 3 * mem[("topk", "ours")]
    assert minimal_bytes("topk", 128, 4096, 2) == grad_bytes and minimal_bytes("topk_kl", 2, 3, 2) == 36


def test_cli_lmhead_ops(tmp_path, capsys) -> None:
    """The LM-head ops report their fraction of the matmul floor (measured in the same run)."""
    out = tmp_path / "lm.json"
    args = "--device cpu --n 48 --widths 300 --k 4 --hidden 16 --ops lmhead,lmhead_topk --impls torch,ours,ours_loss"
    assert main([*args.split(), "--repeats", "5", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["op"], r["impl"], r["k"]) for r in records] == [
        ("lmhead", "torch", 0),
        ("lmhead", "ours", 0),
        ("lmhead", "ours_loss", 0),
        ("lmhead_topk", "torch", 4),
        ("lmhead_topk", "ours", 4),
    ]
    assert all(0 < r["roofline_fraction"] for r in records)
    assert "matmul" in capsys.readouterr().out


def test_floors_and_target_verdicts() -> None:
    """The floors the fractions divide by, and the verdict lines against the speed targets."""
    x = make_inputs(4, 8, torch.device("cpu"), torch.bfloat16, hidden_size=16)
    assert minimal_flops("lmhead", 4, 8, 16) == 6 * 4 * 8 * 16 and minimal_flops("topk", 4, 8, 16) is None
    assert floor_fraction("topk", 1000, 1000, x, 1.0, 2e9, 0) == 2 * 1000 * 1000 / 1e-3 / 2e9
    assert floor_fraction("lmhead_topk", 4, 8, x, 1.0, 0, 1.0) == 2 * 4 * 8 * 16 / 1e-3 / 1e12

    def rec(op: str, impl: str, tp: int, ms: float, frac: float | None) -> Record:
        return Record(op, impl, 8, 8, 0, tp, ms, 1, "cpu", frac)

    lines = target_lines(
        [
            rec("logprob_entropy", "ours", 1, 1.0, 0.93),
            rec("logprob_entropy", "liger", 1, 1.1, 0.85),
            rec("topk", "ours", 4, 1.0, 0.65),
            rec("lmhead", "ours", 1, 2.0, 0.5),
            rec("lmhead", "liger", 1, 1.5, 0.6),
        ]
    )
    assert len(lines) == 3
    assert lines[0].endswith("ahead of Liger: met") and "ours 0.93, liger 0.85" in lines[0]
    assert lines[1].endswith(">= 0.70 of the floor: NOT met")
    assert lines[2].endswith("time <= Liger's: NOT met")
