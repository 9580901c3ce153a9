"""``opd bench student-step``: forward + backward of a student micro-batch at real Qwen3 shapes — tokens/s
and MFU, optionally beside plain transformers on the same tokens.

One rank (TP = PP = 1), random weights, the non-TE layer spec (SDPA; variable-length flash attention on a
GPU; compiled RMSNorm / RoPE / SwiGLU with ``--fusion``), ``--seqs`` sequences of ``--seq-len`` tokens packed
into one THD micro-batch, activation recomputation as asked, the loss of sampled-token OPD on top: on the fused
LM head (``--fused-lm-head on``, the trainer's default: ``kernels.linear_token_logprobs`` on the output layer's
input and weight, no logits tensor) or the fused vocab-parallel log-prob kernel over megatron's logits
(``off``). MFU = model FLOPs (:mod:`megatron_opd.bench.flops`,
recomputation not counted) ÷ the median time of ``--repeats`` runs ÷ the device's dense matmul rate measured
in the same run. The optimizer step (distributed Adam, spread over DP ranks) is not part of the timed work.

``--baseline transformers``: the same model (config, layer count, dtype) in plain ``transformers`` with SDPA
attention, the same tokens as ``--seqs`` rows of ``--seq-len`` (the same causal attention work as the packed
sequences), the same loss kernel, gradient checkpointing when ``--recompute`` is not ``none`` (transformers
has no selective recomputation), timed in the same run after the Megatron model is freed; the record holds
both and the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch

from megatron_opd.bench.common import peak_bytes
from megatron_opd.bench.flops import training_flops
from megatron_opd.bench.model_setup import (
    DTYPES,
    ModelRecord,
    PackedBatch,
    add_model_args,
    build_model,
    check_model_args,
    fusion_option,
    init_single_rank,
    load_config,
    matmul_peak_tflops,
    median_ms,
    packed_batch,
    report,
)


@dataclasses.dataclass
class Record(ModelRecord):
    """The JSON schema of ``--json``."""

    recompute: str
    fused_lm_head: bool  # the loss from the output layer's input and weight, without logits
    time_ms: float  # median forward + backward
    tokens_per_s: float
    model_tflop: float  # per step
    achieved_tflops: float
    peak_tflops_measured: float
    mfu: float
    peak_mem_bytes: int  # above the model's parameters (activations, logits if any, gradients)
    baseline: str | None = None  # "transformers": the same step in plain transformers, in the same run
    baseline_time_ms: float | None = None
    baseline_mfu: float | None = None
    baseline_peak_mem_bytes: int | None = None
    speedup: float | None = None  # baseline_time_ms / time_ms


def transformers_step(
    hf_config: Any, dtype: torch.dtype, device: torch.device, batch: PackedBatch, seqs: int, recompute: str
) -> Callable[[], None]:
    """The baseline's step: ``hf_config`` in transformers (SDPA), the batch's tokens as ``seqs`` rows, the same
    loss; gradient checkpointing unless ``recompute`` is ``none``."""
    from transformers import AutoModelForCausalLM

    from megatron_opd.kernels import token_logprobs

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    model.config.use_cache = False
    if recompute != "none":
        model.gradient_checkpointing_enable()
    model.train()
    ids = batch.inputs["input_ids"].reshape(seqs, -1)

    def step() -> None:
        logits = model(input_ids=ids).logits
        loss = -token_logprobs(logits.reshape(-1, logits.shape[-1]), batch.labels).label_logprob.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def free(device: torch.device) -> None:
    """Return freed memory to the device before the next model is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def student_loss(model: torch.nn.Module, batch: PackedBatch, fused_lm_head: bool) -> torch.Tensor:
    """The benchmark's loss, ``−mean ℓ_S`` over every token, on the fused LM head or on megatron's logits."""
    from megatron_opd.kernels import linear_token_logprobs, token_logprobs
    from megatron_opd.models.forward import model_forward, output_layer_input, output_weight

    if fused_lm_head:
        hidden = output_layer_input(model, model_forward(model, batch.inputs, hidden=True))
        out = linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), output_weight(model), batch.labels)
    else:
        logits = model_forward(model, batch.inputs)
        out = token_logprobs(logits.reshape(-1, logits.shape[-1]), batch.labels)
    return -out.label_logprob.float().mean()


def run(args: argparse.Namespace) -> Record:

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    init_single_rank()
    hf_config = load_config(args.model, args.layers)
    recompute = None if args.recompute == "none" else args.recompute
    model = build_model(hf_config, dtype, device, fusion_option(args), recompute_granularity=recompute)
    model.train()
    batch = packed_batch(hf_config.vocab_size, args.seq_len, args.seqs, device)

    fused = args.fused_lm_head == "on"

    def step() -> None:
        student_loss(model, batch, fused).backward()
        model.zero_grad(set_to_none=True)

    peak = matmul_peak_tflops(device, dtype)
    flop = training_flops(hf_config, batch.seq_lens)
    ms = median_ms(step, device, args.warmup, args.repeats)
    record = Record(
        **ModelRecord.common("student_step", args, hf_config, device),
        recompute=args.recompute,
        fused_lm_head=fused,
        time_ms=ms,
        tokens_per_s=args.seq_len * args.seqs / (ms * 1e-3),
        model_tflop=flop / 1e12,
        achieved_tflops=flop / (ms * 1e-3) / 1e12,
        peak_tflops_measured=peak,
        mfu=flop / (ms * 1e-3) / 1e12 / peak,
        peak_mem_bytes=peak_bytes(step, device),
    )
    if args.baseline == "transformers":
        del model, step
        free(device)
        baseline = transformers_step(hf_config, dtype, device, batch, args.seqs, args.recompute)
        base_ms = median_ms(baseline, device, args.warmup, args.repeats)
        record.baseline = args.baseline
        record.baseline_time_ms = base_ms
        record.baseline_mfu = flop / (base_ms * 1e-3) / 1e12 / peak
        record.baseline_peak_mem_bytes = peak_bytes(baseline, device)
        record.speedup = base_ms / ms
    return record


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench student-step", description=__doc__.split("\n\n")[0])
    add_model_args(p, "configs/models/Qwen3-1.7B", None, 8192, 2)
    p.add_argument("--recompute", default="full", choices=["none", "selective", "full"])
    p.add_argument(
        "--fused-lm-head",
        default="on",
        choices=["on", "off"],
        help="the loss from the output layer's input and weight without logits (the trainer's default), or "
        "through megatron's logits",
    )
    p.add_argument(
        "--baseline",
        default="none",
        choices=["none", "transformers"],
        help="also time the same step in plain transformers (SDPA) and report the ratio",
    )
    args = p.parse_args(argv)
    check_model_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    rec = run(args)
    summary = (
        f"{rec.model} ({rec.layers} layers), {rec.seqs} x {rec.seq_len} tokens packed, recompute {rec.recompute}, "
        f"LM head {'fused' if rec.fused_lm_head else 'logits'}, {rec.dtype}: {rec.time_ms:.1f} ms fwd+bwd, {rec.tokens_per_s:,.0f} tokens/s, {rec.achieved_tflops:.1f} "
        f"TFLOP/s of {rec.peak_tflops_measured:.1f} measured: MFU {rec.mfu:.1%}, "
        f"peak memory {rec.peak_mem_bytes / 2**30:.2f} GiB"
    )
    if rec.baseline is not None:
        summary += (
            f"; {rec.baseline}: {rec.baseline_time_ms:.1f} ms (MFU {rec.baseline_mfu:.1%}, peak memory "
            f"{rec.baseline_peak_mem_bytes / 2**30:.2f} GiB): {rec.speedup:.2f}x the speed of {rec.baseline}"
        )
    return report(rec, summary, args.json)
