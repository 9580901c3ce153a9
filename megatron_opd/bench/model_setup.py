"""What the model benchmarks share: a one-rank Megatron world, a randomly initialized Qwen3 model at real
shapes (optionally fewer layers), a packed (THD) micro-batch, the device's measured matmul peak, versions."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch

from megatron_opd.bench.common import device_name, sync, time_ms, write_records

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_model_args(p: argparse.ArgumentParser, model: str, layers: int | None, seq_len: int, seqs: int) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--model", default=model, help="HF model directory (only config.json is read)")
    p.add_argument("--layers", type=int, default=layers, help="keep the first N layers (default: the config's)")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per packed sequence")
    p.add_argument("--seqs", type=int, default=seqs, help="sequences packed into the micro-batch")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    p.add_argument(
        "--fusion",
        default="auto",
        choices=["auto", "on", "off"],
        help="the non-TE spec's compiled RMSNorm / RoPE / SwiGLU kernels (auto: on with CUDA)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    p.add_argument("--json", metavar="PATH", help="write the record as a one-element JSON list")


def check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    for key in ("seq_len", "seqs", "repeats"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    from megatron_opd.convert.hf_io import CheckpointError, load_hf_config

    try:
        hf_config = load_hf_config(args.model)
    except CheckpointError as e:
        p.error(f"--model: {e}")
    if args.layers is not None and not 0 < args.layers <= hf_config.num_hidden_layers:
        p.error(f"--layers {args.layers}: choose 1 .. the model's {hf_config.num_hidden_layers} layers")
    args.vocab_size = hf_config.vocab_size


@dataclasses.dataclass
class ModelRecord:
    """The fields every model benchmark's record starts with (its ``--json`` schema adds its own)."""

    bench: str
    model: str
    layers: int
    seq_len: int
    seqs: int
    tokens: int
    dtype: str
    fusion: bool  # the local spec's compiled RMSNorm / RoPE / SwiGLU
    device: str
    versions: dict[str, str]

    @classmethod
    def common(cls, bench: str, args: argparse.Namespace, hf_config: Any, device: torch.device) -> dict[str, Any]:
        """This run's values of the shared fields, as keyword arguments of a record."""
        return dict(
            bench=bench,
            model=args.model,
            layers=hf_config.num_hidden_layers,
            seq_len=args.seq_len,
            seqs=args.seqs,
            tokens=args.seq_len * args.seqs,
            dtype=args.dtype,
            fusion=fusion_option(args),
            device=device_name(device),
            versions=versions(),
        )


def report(record: ModelRecord, summary: str, json_path: str | None) -> int:
    """Print the one-line summary (after the device), write the record when asked; the exit code."""
    print(f"{record.device}: {summary}", flush=True)
    if json_path:
        write_records([record], json_path)
    return 0


def init_single_rank() -> None:
    """A world of one process (TP = PP = EP = 1) with megatron's parallel state."""
    from megatron_opd.platform.distributed import (
        DistEnv,
        ParallelSizes,
        free_port,
        init_distributed,
        init_model_parallel,
    )

    init_distributed(DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    init_model_parallel(ParallelSizes())


def load_config(model_dir: str, layers: int | None) -> Any:
    """The model's HF config, cut to its first ``layers`` layers when given."""
    from megatron_opd.convert.hf_io import load_hf_config

    hf_config = load_hf_config(model_dir)
    if layers is not None:
        if layers > hf_config.num_hidden_layers:
            raise ValueError(f"--layers {layers} exceeds the model's {hf_config.num_hidden_layers} layers")
        hf_config.num_hidden_layers = layers
        if getattr(hf_config, "mlp_only_layers", None):
            hf_config.mlp_only_layers = [i for i in hf_config.mlp_only_layers if i < layers]
    return hf_config


def fusion_option(args: argparse.Namespace) -> bool:
    """``--fusion`` resolved (auto: on with CUDA)."""
    from megatron_opd.models.fusion import resolve_fusion

    return resolve_fusion({"auto": None, "on": True, "off": False}[args.fusion])


def build_model(
    hf_config: Any, dtype: torch.dtype, device: torch.device, fusion: bool, **options: Any
) -> torch.nn.Module:
    """Random weights (megatron's init), the non-TE layer spec (SDPA / varlen flash attention; grouped-GEMM
    experts), with or without its compiled kernels."""
    from megatron_opd.models.qwen3 import build_gpt_model

    model = build_gpt_model(hf_config, spec="local", params_dtype=dtype, fusion=fusion, **options)
    return model.to(device)


@dataclasses.dataclass
class PackedBatch:
    inputs: dict[str, Any]  # model_forward's keyword inputs
    labels: torch.Tensor  # [T] next tokens
    seq_lens: list[int]


def packed_batch(vocab: int, seq_len: int, seqs: int, device: torch.device, seed: int = 0) -> PackedBatch:
    """``seqs`` random sequences of ``seq_len`` tokens packed into one THD row."""
    from megatron.core.packed_seq_params import PackedSeqParams

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len * seqs), generator=g)
    cu = torch.arange(0, seq_len * (seqs + 1), seq_len, dtype=torch.int32)
    positions = torch.arange(seq_len).repeat(seqs).unsqueeze(0)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu.to(device),
        cu_seqlens_kv=cu.to(device),
        max_seqlen_q=seq_len,
        max_seqlen_kv=seq_len,
    )
    inputs = {"input_ids": ids.to(device), "position_ids": positions.to(device), "packed_seq_params": params}
    return PackedBatch(inputs, torch.roll(ids[0], -1).to(device), [seq_len] * seqs)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_ms(fn, device) for _ in range(repeats))


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The device's dense matmul rate measured here (the denominator of MFU): ``n³`` GEMMs, ``n`` = 8192 on
    a GPU, 1024 on a CPU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), device, warmup=2, repeats=repeats)
    sync(device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def versions() -> dict[str, str]:
    import megatron.core
    import transformers

    out = {
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "transformers": transformers.__version__,
    }
    out["python"] = platform.python_version()
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out
