"""``opd bench kernels``: time, peak memory and fraction of the hardware floor of the vocab-sized ops, side by side
with plain torch, Liger-Kernel and Megatron-Core in one run, and the speed targets met or not.

Ops (bf16 logits ``[N, V_local]``, one TP rank's shard simulated on one device; no collective is timed):
- ``logprob_entropy``: forward + backward of ``Σ w·log p(label) + Σ w'·H`` (sampled-token OPD's student side).
- ``topk_kl``: forward + backward of the label log-prob plus the forward KL on a K-entry teacher support
  (``token_logprobs(ids=...)`` -> ``support_divergence``: AOPD / LSM / top-K GKD's student side).
- ``topk``: forward-only global top-K ids and log-probs (teacher scoring).
- ``lmhead``: ``logprob_entropy`` from hidden states ``[N, --hidden]`` and the LM-head shard (``ours`` =
  ``linear_token_logprobs``, no logits tensor; ``ours_loss`` = ``linear_logprob_loss``, the gradient computed in the
  forward in three matmuls, as Liger does). CUDA default only.
- ``lmhead_topk``: forward-only top-K, label log-prob and entropy from hidden states (``linear_topk_logprobs``:
  teacher scoring without the logits). CUDA default only.

Implementations: ``ours`` (``megatron_opd.kernels``: Triton on CUDA, the chunked torch path on CPU), ``torch``
(plain fp32 ``log_softmax`` + ``gather``/``topk``), ``liger`` (Liger-Kernel's cross entropy / fused linear cross
entropy, when importable and on CUDA: label log-prob only, no entropy) and ``megatron`` (Megatron-Core's
``vocab_parallel_cross_entropy``, when importable: label log-prob only).

Each record: the median of ``--repeats`` (>= 5) timed runs after ``--warmup`` runs (the first run also autotunes the
Triton kernels); the peak memory of one more run above what was allocated before it (inputs excluded, the gradient
included): on CUDA the caching allocator's ``max_memory_allocated``; on CPU the peak of live tensor storage bytes
created during the run, counted by a ``TorchDispatchMode`` (allocation-exact, unaffected by malloc's reuse, which
makes RSS deltas unreliable); ``roofline_fraction`` = the op's floor ÷ its time: for the logits ops the minimal bytes
(6 B/element for a bf16 forward + backward: read, read, write the gradient; 2 B/element for top-K: one read) at the
copy bandwidth measured in the same run; for the LM-head ops the minimal matmuls (forward + backward: the logits,
``dh`` and ``dW``, 6·N·V·H FLOPs; scoring: the logits, 2·N·V·H) at the bf16 matmul rate measured in the same run.
``config`` names the Triton configs the autotuner chose for ``ours`` on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
from collections.abc import Callable

import torch

from megatron_opd.bench.common import device_name, list_arg, peak_bytes, time_ms, write_records
from megatron_opd.bench.model_setup import matmul_peak_tflops
from megatron_opd.kernels import (
    TokenLogprobs,
    linear_logprob_loss,
    linear_token_logprobs,
    linear_topk_logprobs,
    support_divergence,
    token_logprobs,
    topk_logprobs,
)

OPS = ("logprob_entropy", "topk_kl", "topk", "lmhead", "lmhead_topk")
LMHEAD_OPS = ("lmhead", "lmhead_topk")
K_FREE_OPS = ("logprob_entropy", "lmhead")  # K does not enter these: measured once per (N, V)
# minimal fraction of the floor per (op, tensor-parallel width 1 or more); the LM head instead: no slower than Liger
TARGETS = {
    ("logprob_entropy", 1): 0.90,
    ("topk_kl", 1): 0.80,
    ("topk", 1): 0.80,
    ("logprob_entropy", 2): 0.70,
    ("topk_kl", 2): 0.70,
    ("topk", 2): 0.70,
}
CPU_OPS = ("logprob_entropy", "topk_kl", "topk")  # a [256 x 2048] x [2048 x 151936] bf16 matmul is slow on 2 cores
# torch first: the others' lines print their ratios to it; ours_loss: the LM head with the gradient in the forward
IMPLS = ("torch", "ours", "ours_loss", "liger", "megatron")
VOCAB = 151936
GPU_MATRIX = dict(n=[4096, 16384, 32768], widths=[151936, 37984], k=[32, 64])
CPU_MATRIX = dict(n=[256], widths=[151936, 37984], k=[32])


@dataclasses.dataclass
class Record:
    """One measurement; the JSON schema of ``--json``."""

    op: str
    impl: str
    n: int
    v: int
    k: int
    tp: int
    time_ms: float | None
    peak_mem_bytes: int | None
    device: str
    roofline_fraction: float | None
    dtype: str = "bfloat16"
    note: str = ""
    config: str = ""  # the Triton configs the autotuner chose (ours, CUDA)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), median of ``repeats``."""
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_ms(lambda: dst.copy_(src), device) for _ in range(repeats)]
    return 2 * nbytes / (statistics.median(times) / 1e3)


def minimal_bytes(op: str, n: int, v: int, elem: int) -> int | None:
    """Bytes an ideal kernel must move: forward + backward read the logits twice and write the gradient once;
    ``None`` for the matmul-bound LM-head ops."""
    if op in LMHEAD_OPS:
        return None
    return (1 if op == "topk" else 3) * n * v * elem


def minimal_flops(op: str, n: int, v: int, hidden: int) -> int | None:
    """Matmul FLOPs an ideal LM-head op must do: the logits (2·N·V·H), and for training ``dh`` and ``dW`` too."""
    if op not in LMHEAD_OPS:
        return None
    return (6 if op == "lmhead" else 2) * n * v * hidden


def floor_fraction(op: str, n: int, v: int, x: Inputs, time: float | None, bandwidth: float, tflops: float):
    """The op's floor (``minimal_bytes`` at ``bandwidth`` B/s, or ``minimal_flops`` at ``tflops``) ÷ ``time`` ms."""
    if time is None:
        return None
    nbytes = minimal_bytes(op, n, v, x.logits.element_size())
    if nbytes is not None:
        return nbytes / (time / 1e3) / bandwidth
    return minimal_flops(op, n, v, x.hidden.shape[1]) / (time / 1e3) / (tflops * 1e12)


@dataclasses.dataclass
class Inputs:
    logits: torch.Tensor  # [N, V] requires grad
    labels: torch.Tensor  # [N]
    ids: torch.Tensor | None = None  # [N, K] support ids (random)
    teacher_logp: torch.Tensor | None = None  # [N, K]
    k: int = 0
    hidden: torch.Tensor | None = None  # [N, H] requires grad (lmhead)
    weight: torch.Tensor | None = None  # [V, H] requires grad (lmhead)


def make_inputs(
    n: int, v: int, device: torch.device, dtype: torch.dtype, hidden_size: int = 0, seed: int = 0
) -> Inputs:
    """Random logits (std 2) and labels; with ``hidden_size``, hidden states and an LM head giving logits of std ~2."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, v, device=device, dtype=dtype, generator=g) * 2).requires_grad_(True)
    x = Inputs(logits, torch.randint(0, v, (n,), device=device, generator=g))
    if hidden_size:
        x.hidden = torch.randn(n, hidden_size, device=device, dtype=dtype, generator=g).requires_grad_(True)
        w = torch.randn(v, hidden_size, device=device, dtype=dtype, generator=g) * (2 / hidden_size**0.5)
        x.weight = w.requires_grad_(True)
    return x


def with_support(x: Inputs, k: int, seed: int = 0) -> Inputs:
    """The same logits with K random support ids and teacher log-probs (a sub-distribution: Σ_K p < 1)."""
    n, v = x.logits.shape
    g = torch.Generator(device=x.logits.device).manual_seed(seed + k)
    ids = torch.randint(0, v, (n, k), device=x.logits.device, generator=g)
    teacher = torch.log_softmax(torch.randn(n, k, device=x.logits.device, generator=g), -1) - 0.5
    return dataclasses.replace(x, ids=ids, teacher_logp=teacher, k=k)


def _torch_logp(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z.float(), dim=-1)


def _liger_ce() -> Callable | None:
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss(reduction="sum")


def _megatron_ce() -> Callable | None:
    """Megatron-Core's vocab-parallel cross entropy with a one-rank TP group (set up here if needed)."""
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        from megatron_opd.platform.distributed import ParallelSizes, init_distributed, init_model_parallel

        os.environ.setdefault("MASTER_PORT", "0")
        init_distributed()
        init_model_parallel(ParallelSizes())
    return vocab_parallel_cross_entropy


def build_run(op: str, impl: str, x: Inputs) -> tuple[Callable[[], None] | None, str]:
    """The callable running ``op`` with ``impl`` once (forward, and backward where the op has one), or
    ``(None, why)`` when the implementation does not exist here."""
    z, labels, ids, teacher = x.logits, x.labels, x.ids, x.teacher_logp

    def backward(loss: torch.Tensor) -> None:
        for t in (z, x.hidden, x.weight):
            if t is not None:
                t.grad = None
        loss.backward()

    if op in LMHEAD_OPS:
        return _lmhead_run(op, impl, x, backward)
    if impl == "ours_loss":
        return None, "ours_loss is the LM head's op (lmhead)"
    if impl == "ours":
        if op == "logprob_entropy":
            return lambda: backward(_loss_lp_ent(*token_logprobs(z, labels)[:2])), ""
        if op == "topk_kl":
            return lambda: backward(_loss_kl(token_logprobs(z, labels, ids), teacher)), ""
        return lambda: topk_logprobs(z.detach(), x.k), ""
    if impl == "torch":
        if op == "logprob_entropy":
            return lambda: backward(_loss_lp_ent(*_torch_lp_ent(z, labels))), ""
        if op == "topk_kl":
            return lambda: backward(_loss_kl_torch(z, labels, ids, teacher)), ""

        def topk() -> None:
            with torch.no_grad():
                torch.topk(_torch_logp(z), x.k, dim=-1)

        return topk, ""
    if op != "logprob_entropy":
        return None, f"{impl} has no comparable op"
    if impl == "liger":
        ce = _liger_ce() if z.is_cuda else None
        if ce is None:
            return None, "liger-kernel not importable (or no CUDA)"
        return lambda: backward(ce(z, labels)), "cross entropy only (no entropy)"
    ce = _megatron_ce()
    if ce is None:
        return None, "megatron-core not importable"
    return lambda: backward(ce(z, labels).sum()), "cross entropy only (no entropy)"


def _lmhead_run(op: str, impl: str, x: Inputs, backward: Callable[[torch.Tensor], None]) -> tuple[Callable | None, str]:
    h, w, labels = x.hidden, x.weight, x.labels
    if h is None:
        return None, "no hidden states (run with --hidden > 0)"
    if op == "lmhead_topk":
        if impl == "ours":
            return lambda: linear_topk_logprobs(h.detach(), w.detach(), labels, x.k), ""
        if impl == "torch":

            def score() -> None:
                with torch.no_grad():
                    logp = _torch_logp(h @ w.t())
                    logp.gather(1, labels.unsqueeze(1))
                    (logp.exp() * logp).sum(-1)
                    torch.topk(logp, x.k, dim=-1)

            return score, ""
        return None, f"{impl} has no comparable op"
    if impl == "ours":
        return lambda: backward(_loss_lp_ent(*linear_token_logprobs(h, w, labels)[:2])), ""
    if impl == "ours_loss":

        def row_loss(out: TokenLogprobs, rows: slice) -> torch.Tensor:  # the per-row terms of _loss_lp_ent
            return -out.label_logprob - 0.01 * out.entropy

        return lambda: backward(linear_logprob_loss(h, w, labels, row_loss)[0]), "gradient in the forward"
    if impl == "torch":
        return lambda: backward(_loss_lp_ent(*_torch_lp_ent(h @ w.t(), labels))), ""
    if impl == "liger" and h.is_cuda:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None, "liger-kernel not importable"
        ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda: backward(ce(w, h, labels)), "fused linear cross entropy only (no entropy)"
    return None, f"{impl} has no comparable op"


def _torch_lp_ent(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = _torch_logp(z)
    return logp.gather(1, labels.unsqueeze(1)).squeeze(1), -(logp.exp() * logp).sum(-1)


def _loss_lp_ent(label_logprob: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    return -label_logprob.sum() - 0.01 * entropy.sum()


def _loss_kl(out, teacher: torch.Tensor) -> torch.Tensor:
    return support_divergence(out.ids_logprob, teacher, 0.0).sum() - out.label_logprob.sum()


def _loss_kl_torch(z, labels, ids, teacher) -> torch.Tensor:
    logp = _torch_logp(z)
    d = support_divergence(logp.gather(1, ids), teacher, 0.0)
    return d.sum() - logp.gather(1, labels.unsqueeze(1)).sum()


def measure(
    op: str, impl: str, x: Inputs, device: torch.device, warmup: int, repeats: int
) -> tuple[float | None, int | None, str]:
    """(median ms, peak bytes, note) of one available (op, impl); ``(None, None, "out of memory")`` on OOM."""
    run, note = build_run(op, impl, x)
    try:
        for _ in range(warmup):
            run()
        times = [time_ms(run, device) for _ in range(repeats)]
        peak = peak_bytes(run, device)
    except torch.OutOfMemoryError:
        return None, None, "out of memory"
    finally:
        x.logits.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return statistics.median(times), peak, note


def run_matrix(args: argparse.Namespace) -> list[Record]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = device_name(device)
    bandwidth = copy_bandwidth(device, args.repeats)
    lmhead = any(op in LMHEAD_OPS for op in args.ops)
    tflops = matmul_peak_tflops(device, dtype, args.repeats) if lmhead else 0.0
    print(
        f"device: {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
        + (f"; {args.dtype} matmul {tflops:.0f} TFLOP/s" if lmhead else "")
        + f"; dtype {args.dtype}; median of {args.repeats} runs after {args.warmup} warm-up",
        flush=True,
    )
    probe = with_support(make_inputs(2, 8, device, dtype, hidden_size=4), 1)
    for impl in args.impls:
        if all(build_run(op, impl, probe)[0] is None for op in args.ops):
            print(f"skipping {impl}: {build_run(args.ops[0], impl, probe)[1]}", flush=True)
    records: list[Record] = []
    for n in args.n:
        for v in args.widths:
            base = make_inputs(n, v, device, dtype, hidden_size=args.hidden if lmhead else 0)
            for k in args.k:
                x = with_support(base, k)
                for op in args.ops:
                    if op in K_FREE_OPS and k != args.k[0]:
                        continue  # K does not enter this op: measured once per (N, V)
                    for impl in args.impls:
                        if build_run(op, impl, x)[0] is None:
                            continue  # not available here, or no comparable op
                        t, peak, note = measure(op, impl, x, device, args.warmup, args.repeats)
                        records.append(
                            Record(
                                op=op,
                                impl=impl,
                                n=n,
                                v=v,
                                k=0 if op in K_FREE_OPS else k,
                                tp=max(1, round(args.vocab / v)),
                                time_ms=t,
                                peak_mem_bytes=peak,
                                device=name,
                                roofline_fraction=floor_fraction(op, n, v, x, t, bandwidth, tflops),
                                dtype=args.dtype,
                                note=note,
                                config=chosen_configs() if impl == "ours" and device.type == "cuda" else "",
                            )
                        )
                        print(_row(records[-1], records), flush=True)
            del base, x
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def chosen_configs() -> str:
    """The configs Triton's autotuner chose in the last call of each kernel (empty where none ran)."""
    from megatron_opd.kernels import triton_backend

    return "; ".join(f"{name}: {config}" for name, config in triton_backend.chosen_configs().items())


def target_lines(records: list[Record]) -> list[str]:
    """One line per (op, N, V, K) measured by ``ours``: its fraction of the floor, Liger's, the target, met or not."""
    lines = []
    for rec in (r for r in records if r.impl in ("ours", "ours_loss") and r.time_ms is not None):
        liger = next(
            (r for r in records if (r.op, r.n, r.v, r.k, r.impl) == (rec.op, rec.n, rec.v, rec.k, "liger")), None
        )
        liger_ms = None if liger is None else liger.time_ms
        target = TARGETS.get((rec.op, min(rec.tp, 2)))
        if rec.op == "lmhead":
            met = None if liger_ms is None else rec.time_ms <= liger_ms
            want = "time <= Liger's"
        elif target is not None:
            met = rec.roofline_fraction >= target and (liger_ms is None or rec.time_ms <= liger_ms)
            want = f">= {target:.2f} of the floor" + (" and ahead of Liger" if liger_ms is not None else "")
        else:
            continue
        frac = "-" if rec.roofline_fraction is None else f"{rec.roofline_fraction:.2f}"
        other = "" if liger is None or liger.roofline_fraction is None else f", liger {liger.roofline_fraction:.2f}"
        other += "" if liger_ms is None else f" ({rec.time_ms:.2f} vs {liger_ms:.2f} ms)"
        verdict = "unknown (no Liger)" if met is None else ("met" if met else "NOT met")
        lines.append(
            f"target {rec.op:15s} n={rec.n:<6d} v={rec.v:<7d}(tp{rec.tp}) k={rec.k:<3d} {rec.impl} {frac}{other}; "
            f"{want}: {verdict}"
        )
    return lines


def _row(rec: Record, records: list[Record]) -> str:
    """One line of the table, with time and memory ratios against the plain-torch record of the same case."""
    base = next((r for r in records if (r.op, r.n, r.v, r.k, r.impl) == (rec.op, rec.n, rec.v, rec.k, "torch")), None)
    t = "-" if rec.time_ms is None else f"{rec.time_ms:9.2f}"
    mem = "-" if rec.peak_mem_bytes is None else f"{rec.peak_mem_bytes / 2**20:9.1f}"
    roof = "-" if rec.roofline_fraction is None else f"{rec.roofline_fraction:5.2f}"
    speed = ratio = "-"
    if base is not None and base is not rec and base.time_ms and rec.time_ms:
        speed = f"{base.time_ms / rec.time_ms:5.2f}x"
    if base is not None and base is not rec and base.peak_mem_bytes and rec.peak_mem_bytes:
        ratio = f"{base.peak_mem_bytes / rec.peak_mem_bytes:5.2f}x"
    return (
        f"{rec.op:16s} n={rec.n:<6d} v={rec.v:<7d}(tp{rec.tp}) k={rec.k:<3d} {rec.impl:9s} "
        f"time_ms={t} peak_MiB={mem} roofline={roof} torch/this: time {speed} mem {ratio} {rec.note}"
        + (f" [{rec.config}]" if rec.config else "")
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--n", type=_ints, help="tokens per call, comma-separated (default: the device's matrix)")
    p.add_argument("--widths", type=_ints, help="TP-local vocab widths V_local, comma-separated")
    p.add_argument("--k", type=_ints, help="support / top-K sizes, comma-separated")
    p.add_argument("--vocab", type=int, default=VOCAB, help="global vocabulary (tp = vocab / width)")
    p.add_argument("--ops", type=list_arg(OPS), help=f"subset of {','.join(OPS)} (CPU default: no LM-head ops)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size for lmhead (Qwen3-1.7B: 2048)")
    p.add_argument("--impls", type=list_arg(IMPLS), default=list(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per record (>= 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    if args.repeats < 5:
        p.error(f"--repeats {args.repeats}: use at least 5 (medians of >= 5 runs)")
    matrix = GPU_MATRIX if args.device == "cuda" else CPU_MATRIX
    for key in ("n", "widths", "k"):
        if getattr(args, key) is None:
            setattr(args, key, matrix[key])
    if args.ops is None:
        args.ops = list(OPS if args.device == "cuda" else CPU_OPS)
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    return args


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 4096,16384") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    records = run_matrix(args)
    for line in target_lines(records):
        print(line)
    if args.json:
        write_records(records, args.json)
    return 0
