"""``opd bench student-step`` / ``teacher-scoring``: the model-FLOPs count equals what torch's FLOP counter
measures on the transformers model, and both benchmarks run at tiny shapes and write their records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_opd.bench.flops import attention_flops, forward_flops, training_flops
from megatron_opd.models.tiny import save_tiny_model, tiny_config
from megatron_opd.platform.spawn import spawn_world
from tests.tolerance import FORWARD_ULPS, float64_approx, ulps

CONFIGS = {
    "dense": tiny_config(),
    "dense_tied_mqa": tiny_config(num_key_value_heads=1, tie_word_embeddings=True),
    "moe": tiny_config(moe=True),
    "moe_sparse_step": tiny_config(moe=True, num_hidden_layers=4, decoder_sparse_step=2, intermediate_size=80),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_flops_match_the_flop_counter(name: str) -> None:
    """Eager attention scores all s x s pairs (masked afterwards): the counter sees 4·L·q·s² there; everything
    else it counts is the per-token matmul work ``forward_flops`` claims."""
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[name]
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    s = 11
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randint(0, cfg.vocab_size, (1, s)))
    q = cfg.num_attention_heads * cfg.head_dim
    eager_attention = 4 * cfg.num_hidden_layers * q * s * s
    causal = attention_flops(cfg, [s])
    assert causal == 4 * cfg.num_hidden_layers * q * (s * (s + 1) // 2)
    assert forward_flops(cfg, [s]) - causal == counter.get_total_flops() - eager_attention
    assert training_flops(cfg, [s, 3]) == 3 * (forward_flops(cfg, [s]) + forward_flops(cfg, [3]))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_models")
    save_tiny_model(root / "dense", tiny_config(num_hidden_layers=3))
    save_tiny_model(root / "moe", tiny_config(moe=True))
    return root


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "bench", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_student_step_writes_its_record(models: Path, tmp_path: Path) -> None:
    """With the transformers baseline timed in the same run (the fusion switch auto: off without CUDA)."""
    out = tmp_path / "s.json"
    args = ["--model", str(models / "dense"), "--layers", "2", "--seq-len", "24", "--seqs", "2"]
    proc = bench(
        "student-step", *args, "--warmup", "1", "--repeats", "2", "--baseline", "transformers", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert rec["bench"] == "student_step" and rec["layers"] == 2 and rec["tokens"] == 48 and rec["recompute"] == "full"
    assert rec["fusion"] is False and rec["fused_lm_head"] is True  # the trainer's default
    cfg = tiny_config(num_hidden_layers=2)
    # float64 products and quotients of the same positive numbers in another order: a rounding per operation
    assert rec["model_tflop"] == float64_approx(training_flops(cfg, [24, 24]) / 1e12, rec["model_tflop"], 2)
    want = rec["model_tflop"] / (rec["time_ms"] * 1e-3)
    assert rec["achieved_tflops"] == float64_approx(want, want, 4)
    want = rec["achieved_tflops"] / rec["peak_tflops_measured"]
    assert rec["mfu"] == float64_approx(want, want, 6)
    assert rec["tokens_per_s"] == float64_approx(48 / (rec["time_ms"] * 1e-3), rec["tokens_per_s"], 4)
    assert rec["peak_mem_bytes"] > 0 and rec["versions"]["megatron_core"].startswith("0.")
    assert rec["baseline"] == "transformers" and rec["baseline_peak_mem_bytes"] > 0
    assert rec["speedup"] == rec["baseline_time_ms"] / rec["time_ms"]  # the same division
    want = rec["mfu"] * rec["time_ms"] / rec["baseline_time_ms"]
    assert rec["baseline_mfu"] == float64_approx(want, want, 10)
    assert "MFU" in proc.stdout and "x the speed of transformers" in proc.stdout


def _student_losses(tied: bool) -> dict[bool, tuple[float, dict[str, torch.Tensor]]]:
    from megatron_opd.bench.model_setup import build_model, init_single_rank, packed_batch
    from megatron_opd.bench.student_step import student_loss

    init_single_rank()
    cfg = tiny_config(num_hidden_layers=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = build_model(cfg, torch.float32, torch.device("cpu"), False)
    batch = packed_batch(cfg.vocab_size, 7, 3, torch.device("cpu"))
    out = {}
    for fused in (False, True):
        loss = student_loss(model, batch, fused)
        loss.backward()
        out[fused] = (float(loss), {n: p.grad.numpy().copy() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_student_step_loss_is_the_same_either_way(tied: bool) -> None:
    """``--fused-lm-head on`` and ``off`` time the same loss: equal values and gradients of every parameter."""
    got = spawn_world(_student_losses, 1, tied)[0]
    (loss, grads), (f_loss, f_grads) = got[False], got[True]
    assert f_loss == pytest.approx(loss, rel=0, abs=ulps(torch.float32, max(1.0, abs(loss)), 2 * FORWARD_ULPS))
    assert sorted(f_grads) == sorted(grads)
    for name, g in grads.items():
        # fp32 gradients of one loss, the LM head's matmuls chunked differently
        atol = ulps(torch.float32, max(float(abs(g).max()), 1e-6), 4 * FORWARD_ULPS)
        torch.testing.assert_close(torch.from_numpy(f_grads[name]), torch.from_numpy(g), atol=atol, rtol=0)


def test_transformers_baseline_step_is_the_same_work(models: Path) -> None:
    """The baseline feeds transformers the packed micro-batch's tokens, one row per packed sequence."""
    from transformers import AutoModelForCausalLM

    from megatron_opd.bench.model_setup import packed_batch
    from megatron_opd.bench.student_step import transformers_step

    cfg = tiny_config(num_hidden_layers=2)
    batch = packed_batch(cfg.vocab_size, 6, 3, torch.device("cpu"))
    seen: list[torch.Tensor] = []
    original = AutoModelForCausalLM.from_config

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        model = original(*args, **kwargs)
        model.register_forward_hook(lambda m, inputs, kw, out: seen.append(kw["input_ids"]), with_kwargs=True)
        return model

    AutoModelForCausalLM.from_config = spy
    try:
        transformers_step(cfg, torch.float32, torch.device("cpu"), batch, 3, "none")()
    finally:
        AutoModelForCausalLM.from_config = original
    (ids,) = seen
    assert ids.shape == (3, 6) and torch.equal(ids.reshape(1, -1), batch.inputs["input_ids"])


@pytest.mark.slow
def test_teacher_scoring_writes_its_record(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    args = ["--model", str(models / "moe"), "--layers", "2", "--seq-len", "16", "--seqs", "2", "--top-k", "8"]
    proc = bench("teacher-scoring", *args, "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert rec["bench"] == "teacher_scoring" and rec["tokens"] == 32 and rec["top_k"] == 8
    total = rec["forward_ms"] + rec["topk_ms"]
    # the record's own expressions on the same numbers: bitwise
    assert rec["topk_fraction"] == rec["topk_ms"] / total
    assert rec["tokens_per_s"] == 32 / (total * 1e-3)
    assert rec["mfu"] == rec["achieved_tflops"] / rec["peak_tflops_measured"]
    cfg = tiny_config(moe=True)
    assert rec["achieved_tflops"] == forward_flops(cfg, [16, 16]) / (rec["forward_ms"] * 1e-3) / 1e12


def test_bad_arguments_are_refused(models: Path) -> None:
    proc = bench("student-step", "--model", str(models / "dense"), "--seq-len", "0")
    assert proc.returncode == 2 and "--seq-len must be > 0" in proc.stderr
    proc = bench("teacher-scoring", "--model", str(models / "moe"), "--layers", "9")
    assert proc.returncode == 2 and "--layers 9: choose 1 .. the model's 2 layers" in proc.stderr
    proc = bench("teacher-scoring", "--model", str(models / "moe"), "--layers", "2", "--top-k", "129")
    assert proc.returncode == 2 and "--top-k 129: choose 1 .. the vocabulary size 128" in proc.stderr
    proc = bench("student-step", "--model", str(models / "nowhere"))
    assert proc.returncode == 2 and "--model: " in proc.stderr and "no config.json" in proc.stderr
    proc = bench("student-step", "--model", str(models / "dense"), "--baseline", "vllm")
    assert proc.returncode == 2 and "--baseline: invalid choice: 'vllm'" in proc.stderr


def test_fusion_switch(models: Path) -> None:
    from megatron_opd.bench.model_setup import fusion_option
    from megatron_opd.bench.student_step import parse_args

    base = ["--model", str(models / "dense")]
    assert fusion_option(parse_args([*base, "--fusion", "on"])) is True
    assert fusion_option(parse_args([*base, "--fusion", "off"])) is False
    assert fusion_option(parse_args(base)) is torch.cuda.is_available()
