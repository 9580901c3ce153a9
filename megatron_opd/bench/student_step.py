"""``opd bench student-step``: forward + backward of a student micro-batch at real Qwen3 shapes — tokens/s
and MFU (issue 11).

One rank (TP = PP = 1), random weights, the non-TE layer spec (SDPA; variable-length flash attention on a
GPU), ``--seqs`` sequences of ``--seq-len`` tokens packed into one THD micro-batch, activation
recomputation as asked, the loss of sampled-token OPD on top (the fused vocab-parallel log-prob kernel over
the logits). MFU = model FLOPs (:mod:`megatron_opd.bench.flops`, recomputation not counted) ÷ the median
time of ``--repeats`` runs ÷ the device's dense matmul rate measured in the same run. The optimizer step
(distributed Adam, spread over DP ranks) is not part of the timed work.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from megatron_opd.bench.common import peak_bytes
from megatron_opd.bench.flops import training_flops
from megatron_opd.bench.model_setup import (
    DTYPES,
    ModelRecord,
    add_model_args,
    build_model,
    check_model_args,
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
    time_ms: float  # median forward + backward
    tokens_per_s: float
    model_tflop: float  # per step
    achieved_tflops: float
    peak_tflops_measured: float
    mfu: float
    peak_mem_bytes: int  # above the model's parameters (activations, logits, gradients)


def run(args: argparse.Namespace) -> Record:
    from megatron_opd.kernels import token_logprobs
    from megatron_opd.models.forward import model_forward

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    init_single_rank()
    hf_config = load_config(args.model, args.layers)
    recompute = None if args.recompute == "none" else args.recompute
    model = build_model(hf_config, dtype, device, recompute_granularity=recompute)
    model.train()
    batch = packed_batch(hf_config.vocab_size, args.seq_len, args.seqs, device)

    def step() -> None:
        logits = model_forward(model, batch.inputs)
        loss = -token_logprobs(logits.reshape(-1, logits.shape[-1]), batch.labels).label_logprob.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    ms = median_ms(step, device, args.warmup, args.repeats)
    memory = peak_bytes(step, device)
    peak = matmul_peak_tflops(device, dtype)
    flop = training_flops(hf_config, batch.seq_lens)
    achieved = flop / (ms * 1e-3) / 1e12
    return Record(
        **ModelRecord.common("student_step", args, hf_config, device),
        recompute=args.recompute,
        time_ms=ms,
        tokens_per_s=args.seq_len * args.seqs / (ms * 1e-3),
        model_tflop=flop / 1e12,
        achieved_tflops=achieved,
        peak_tflops_measured=peak,
        mfu=achieved / peak,
        peak_mem_bytes=memory,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench student-step", description=__doc__.split("\n\n")[0])
    add_model_args(p, "configs/models/Qwen3-1.7B", None, 8192, 2)
    p.add_argument("--recompute", default="full", choices=["none", "selective", "full"])
    args = p.parse_args(argv)
    check_model_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    rec = run(args)
    summary = (
        f"{rec.model} ({rec.layers} layers), {rec.seqs} x {rec.seq_len} tokens packed, recompute {rec.recompute}, "
        f"{rec.dtype}: {rec.time_ms:.1f} ms fwd+bwd, {rec.tokens_per_s:,.0f} tokens/s, {rec.achieved_tflops:.1f} "
        f"TFLOP/s of {rec.peak_tflops_measured:.1f} measured: MFU {rec.mfu:.1%}, "
        f"peak memory {rec.peak_mem_bytes / 2**30:.2f} GiB"
    )
    return report(rec, summary, args.json)
