"""``opd bench objectives``: peak memory and time of each objective's loss, forward + backward, on the
production vocab-parallel path (``objectives.registry``: the kernels plus [N, K] math) vs the full-logits
reference (``objectives/reference.py``: log_softmax over [N, V], teacher logits [N, V]).

One device, TP = 1 (the vocab-parallel path on one rank). Student logits ``[N, V]`` in ``--dtype`` with grad;
the production path gets what scoring ships (teacher log-probs at the sampled tokens and on its top-K), the
reference gets the teacher's full logits. Peak memory is the tensor storage allocated during one run above
what existed before it (inputs excluded, the logits gradient included): ``max_memory_allocated`` on CUDA,
:class:`megatron_opd.bench.common.LiveTensorBytes` on CPU. Time is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
from collections.abc import Callable

import torch

from megatron_opd.bench.common import device_name, list_arg, peak_bytes, time_ms, write_records
from megatron_opd.kernels import token_logprobs, topk_logprobs
from megatron_opd.objectives import reference as ref
from megatron_opd.objectives.config import ObjectiveConfig
from megatron_opd.objectives.inputs import TokenBatch
from megatron_opd.objectives.registry import build_objective

OBJECTIVES = ("opd", "exopd", "aopd", "lsm", "gkd", "sft")
IMPLS = ("reference", "ours")  # reference first: the production line prints its ratios to it


@dataclasses.dataclass
class Record:
    """One measurement; the JSON schema of ``--json``."""

    objective: str
    impl: str
    n: int
    v: int
    k: int
    dtype: str
    device: str
    time_ms: float
    peak_mem_bytes: int
    input_bytes: int  # what the implementation is handed besides the student logits


@dataclasses.dataclass
class Inputs:
    """Student logits and everything either implementation needs, built once per (N, V, K)."""

    logits: torch.Tensor  # [N, V] with grad
    teacher_logits: torch.Tensor  # [N, V], reference only
    labels: torch.Tensor
    weights: torch.Tensor  # token-mean weights
    teacher_logp: torch.Tensor  # [N] ℓ_T
    ref_logp: torch.Tensor  # [N] ℓ_R
    rollout_logp: torch.Tensor  # [N] ℓ_roll
    support_ids: torch.Tensor  # [N, K] teacher top-K
    support_teacher_logp: torch.Tensor  # [N, K]


def make_inputs(n: int, v: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, device=device, dtype=dtype) * 2).requires_grad_(True)
    teacher = torch.randn(n, v, generator=g, device=device, dtype=dtype) * 2
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    with torch.no_grad():
        ids, support_logp = topk_logprobs(teacher, k)
        teacher_logp = token_logprobs(teacher, labels).label_logprob
        student_logp = token_logprobs(logits.detach(), labels).label_logprob
    noise = torch.randn(n, generator=g, device=device)
    return Inputs(
        logits=logits,
        teacher_logits=teacher,
        labels=labels,
        weights=torch.full((n,), 1.0 / n, device=device),
        teacher_logp=teacher_logp,
        ref_logp=teacher_logp - 1.0 + noise,
        rollout_logp=student_logp + 0.1 * noise,
        support_ids=ids,
        support_teacher_logp=support_logp,
    )


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_run(objective: str, impl: str, x: Inputs, k: int) -> tuple[Callable[[], None], int]:
    """(one forward + backward of ``objective`` by ``impl``, bytes of its inputs besides the student logits)."""
    z = x.logits

    def backward(loss: torch.Tensor) -> None:
        z.grad = None
        loss.backward()

    if impl == "reference":
        zt, y = x.teacher_logits, x.labels
        per_token: dict[str, Callable[[], torch.Tensor]] = {
            "opd": lambda: ref.opd_token_loss(z, y, x.teacher_logp),
            "exopd": lambda: ref.opd_token_loss(z, y, x.teacher_logp, x.ref_logp, 1.25),
            "aopd": lambda: ref.aopd_token_loss(z, zt, y, k, 0.0),
            "lsm": lambda: ref.lsm_token_loss(z, zt, y, k),
            "gkd": lambda: ref.jsd_token_loss(z, zt, 0.0, top_k=k),
            "sft": lambda: ref.sft_token_loss(z, y),
        }
        uses_teacher_logits = objective in ("aopd", "lsm", "gkd")
        inputs = _nbytes(x.labels, x.teacher_logp, x.ref_logp) + (_nbytes(zt) if uses_teacher_logits else 0)
        return lambda: backward((per_token[objective]() * x.weights).sum()), inputs
    cfg = ObjectiveConfig(name=objective, top_k=k)
    obj = build_objective(cfg)
    on_policy = objective != "sft"
    batch = TokenBatch(
        logits=z,
        labels=x.labels,
        response_mask=torch.ones_like(x.weights),
        token_weight=x.weights,
        seq_index=torch.arange(z.shape[0], device=z.device) // 512,
        teacher_logp=x.teacher_logp if on_policy else None,
        ref_logp=x.ref_logp if obj.requirements.reference is not None else None,
        rollout_logp=x.rollout_logp if on_policy else None,
        support_ids=x.support_ids if on_policy else None,
        support_teacher_logp=x.support_teacher_logp if on_policy else None,
    )
    fields = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    fields = [t for t in fields if isinstance(t, torch.Tensor) and t is not z]
    return lambda: backward(obj(batch).loss), _nbytes(*fields)


def measure(objective: str, impl: str, x: Inputs, k: int, device: torch.device, repeats: int) -> tuple[float, int, int]:
    """(median ms, peak bytes, input bytes) of one (objective, impl)."""
    run, inputs = build_run(objective, impl, x, k)
    try:
        times = [time_ms(run, device) for _ in range(repeats)]
        peak = peak_bytes(run, device)
    finally:
        x.logits.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return statistics.median(times), peak, inputs


def run(args: argparse.Namespace) -> list[Record]:
    device = torch.device(args.device)
    name = device_name(device)
    print(
        f"device: {name}; dtype {args.dtype}; N={args.tokens} V={args.vocab} K={args.top_k}; "
        f"median of {args.repeats} runs; peak = tensor memory above the inputs (gradient included)",
        flush=True,
    )
    x = make_inputs(args.tokens, args.vocab, args.top_k, getattr(torch, args.dtype), device)
    records: list[Record] = []
    for objective in args.objectives:
        for impl in args.impls:
            t, peak, inputs = measure(objective, impl, x, args.top_k, device, args.repeats)
            rec = Record(objective, impl, args.tokens, args.vocab, args.top_k, args.dtype, name, t, peak, inputs)
            records.append(rec)
            print(_row(rec, records), flush=True)
    return records


def _row(rec: Record, records: list[Record]) -> str:
    base = next((r for r in records if r.objective == rec.objective and r.impl == "reference"), None)
    ratio = ""
    if base is not None and base is not rec and rec.peak_mem_bytes and rec.time_ms:
        ratio = (
            f"  reference/ours: memory {base.peak_mem_bytes / rec.peak_mem_bytes:5.1f}x, "
            f"time {base.time_ms / rec.time_ms:5.2f}x"
        )
    return (
        f"{rec.objective:6s} {rec.impl:9s} peak_MiB={rec.peak_mem_bytes / 2**20:9.1f} "
        f"time_ms={rec.time_ms:9.1f} inputs_MiB={rec.input_bytes / 2**20:8.1f}{ratio}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench objectives", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tokens", type=int, default=4096, help="N, response tokens in the micro-batch")
    p.add_argument("--vocab", type=int, default=151936, help="V (Qwen3: 151936)")
    p.add_argument("--top-k", type=int, default=32, help="K of the top-K supports")
    p.add_argument("--objectives", type=list_arg(OBJECTIVES), default=["opd", "aopd", "lsm"], help=",".join(OBJECTIVES))
    p.add_argument("--impls", type=list_arg(IMPLS), default=list(IMPLS), help=",".join(IMPLS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=1, help="timed runs per record (median)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    for key in ("tokens", "vocab", "top_k", "repeats"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0")
    if args.top_k > args.vocab:
        p.error(f"--top-k {args.top_k} exceeds --vocab {args.vocab}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    records = run(args)
    if args.json:
        write_records(records, args.json)
    return 0
