"""``opd bench teacher-scoring``: a frozen teacher scoring responses at real Qwen3-MoE shapes — tokens/s,
and the share of the time spent taking the top-K.

One rank, random weights, the non-TE layer spec (experts as grouped GEMMs; built ``frozen``: no
recomputation or router losses, eval mode, no gradients), the model cut to ``--layers`` layers so it fits one GPU
(Qwen3-30B-A3B: 1.1 GiB of bf16 weights per layer plus 0.6 GiB of embeddings and LM head; the default 16
of 48 layers is ≈ 18.8 GiB). Per micro-batch of ``--seqs`` packed sequences of ``--seq-len`` tokens: the
forward to the logits, then what scoring ships — the sampled-token log-prob and the full-vocabulary top-K
(ids and log-probs) of every token, through the vocab-parallel kernels. Times are medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from megatron_opd.bench.common import peak_bytes
from megatron_opd.bench.flops import forward_flops
from megatron_opd.bench.model_setup import (
    DTYPES,
    ModelRecord,
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

    top_k: int
    forward_ms: float  # median, to the logits
    topk_ms: float  # median, sampled-token log-prob + top-K on those logits
    topk_fraction: float  # topk_ms / (forward_ms + topk_ms)
    tokens_per_s: float  # scored tokens per second, both parts
    achieved_tflops: float  # model FLOPs of the forward / its time
    peak_tflops_measured: float  # the device's dense matmul rate, measured in the same run
    mfu: float  # achieved_tflops / peak_tflops_measured
    peak_mem_bytes: int  # above the weights


def run(args: argparse.Namespace) -> Record:
    from megatron_opd.kernels import token_logprobs, topk_logprobs
    from megatron_opd.models.forward import model_forward

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    init_single_rank()
    hf_config = load_config(args.model, args.layers)
    model = build_model(hf_config, dtype, device, fusion_option(args), frozen=True)
    batch = packed_batch(hf_config.vocab_size, args.seq_len, args.seqs, device)
    with torch.no_grad():
        logits = model_forward(model, batch.inputs).reshape(-1, hf_config.vocab_size)

    def forward() -> None:
        with torch.no_grad():
            model_forward(model, batch.inputs)

    def topk() -> None:
        with torch.no_grad():
            token_logprobs(logits, batch.labels)
            topk_logprobs(logits, args.top_k)

    forward_ms = median_ms(forward, device, args.warmup, args.repeats)
    topk_ms = median_ms(topk, device, args.warmup, args.repeats)
    logits = logits.new_empty(0)  # freed before the memory run

    def score() -> None:
        with torch.no_grad():
            out = model_forward(model, batch.inputs).reshape(-1, hf_config.vocab_size)
            token_logprobs(out, batch.labels)
            topk_logprobs(out, args.top_k)

    memory = peak_bytes(score, device)
    achieved = forward_flops(hf_config, batch.seq_lens) / (forward_ms * 1e-3) / 1e12
    peak = matmul_peak_tflops(device, dtype)
    return Record(
        **ModelRecord.common("teacher_scoring", args, hf_config, device),
        top_k=args.top_k,
        forward_ms=forward_ms,
        topk_ms=topk_ms,
        topk_fraction=topk_ms / (forward_ms + topk_ms),
        tokens_per_s=args.seq_len * args.seqs / ((forward_ms + topk_ms) * 1e-3),
        achieved_tflops=achieved,
        peak_tflops_measured=peak,
        mfu=achieved / peak,
        peak_mem_bytes=memory,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench teacher-scoring", description=__doc__.split("\n\n")[0])
    add_model_args(p, "configs/models/Qwen3-30B-A3B-Instruct-2507", 16, 8192, 2)
    p.add_argument("--top-k", type=int, default=32, help="K of the teacher's top-K")
    args = p.parse_args(argv)
    check_model_args(p, args)
    if not 0 < args.top_k <= args.vocab_size:
        p.error(f"--top-k {args.top_k}: choose 1 .. the vocabulary size {args.vocab_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    rec = run(args)
    summary = (
        f"{rec.model} cut to {rec.layers} layers, {rec.seqs} x {rec.seq_len} tokens packed, top-{rec.top_k}, "
        f"{rec.dtype}: forward {rec.forward_ms:.1f} ms + top-K {rec.topk_ms:.1f} ms ({rec.topk_fraction:.1%}), "
        f"{rec.tokens_per_s:,.0f} tokens/s, {rec.achieved_tflops:.1f} TFLOP/s in the forward "
        f"({rec.mfu:.1%} of {rec.peak_tflops_measured:.1f} measured), "
        f"peak memory {rec.peak_mem_bytes / 2**30:.2f} GiB"
    )
    return report(rec, summary, args.json)
