"""``opd convert``: checkpoint conversion between Hugging Face and Megatron-Core, and ExPO.

    opd convert hf-to-mcore --hf-dir DIR --out DIR [--tp N --pp N --ep N --etp N] [--dtype bf16|fp16|fp32]
    opd convert mcore-to-hf --mcore-dir DIR --out DIR [--max-shard-size 2GiB]
    opd convert extrapolate --student DIR --teachers DIR [DIR ...] --alpha A --out DIR

Every command streams (bounded memory), shows a progress bar, refuses an existing ``--out``
unless ``--overwrite`` is given, and leaves nothing behind when it fails.
"""

from __future__ import annotations

import argparse
import re
import sys

from megatron_opd.convert.hf_io import CheckpointError

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``"2GiB"``, ``"500MB"``, ``"1024"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m[2].lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GiB, 500MB)")
    size = int(float(m[1]) * _SIZE_UNITS[m[2].lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return size


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd convert", description="Checkpoint conversion between Hugging Face and Megatron-Core, and ExPO."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron-Core torch_dist checkpoint")
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tp", type=_positive, default=1, help="tensor parallel size the chunks are laid out for")
    p.add_argument("--pp", type=_positive, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=_positive, default=1, help="expert parallel size (MoE)")
    p.add_argument("--etp", type=_positive, default=None, help="expert tensor parallel size (default: --tp)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the HF checkpoint's")
    p.add_argument("--iteration", type=int, default=0, help="iteration recorded in the checkpoint")

    p = sub.add_parser("mcore-to-hf", help="Megatron-Core torch_dist checkpoint -> HF safetensors")
    p.add_argument("--mcore-dir", required=True, help="checkpoint root (or one iter_XXXXXXX directory)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--max-shard-size", type=parse_size, default="2GiB", help="largest safetensors shard")

    p = sub.add_parser("extrapolate", help="ExPO: θ = θ_avg + α(θ_avg − θ_student), HF in and out")
    p.add_argument("--student", required=True, help="HF directory of the student")
    p.add_argument("--teachers", required=True, nargs="+", help="HF directories of the teachers (averaged)")
    p.add_argument("--alpha", required=True, type=float, help="extrapolation strength, e.g. 0.25 or 0.5")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--max-shard-size", type=parse_size, default="2GiB", help="largest safetensors shard")

    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _worker_summary(error: Exception) -> str:
    """The exception line of each failed rank's traceback (spawned conversions)."""
    blocks = re.split(r"^(rank \d+):\n", str(error), flags=re.M)
    lines = [
        f"{rank}: {body.strip().splitlines()[-1]}" for rank, body in zip(blocks[1::2], blocks[2::2]) if body.strip()
    ]
    return "; ".join(lines) or str(error)


def run(args: argparse.Namespace) -> str:
    """Run one parsed command; returns its summary line."""
    from megatron_opd.platform.distributed import ParallelSizes

    progress = not args.no_progress
    if args.command == "hf-to-mcore":
        from megatron_opd.convert.hf_to_mcore import DTYPES, convert_hf_to_mcore

        sizes = ParallelSizes(args.tp, args.pp, args.ep, args.etp)
        dtype = DTYPES[args.dtype] if args.dtype else None
        report = convert_hf_to_mcore(
            args.hf_dir,
            args.out,
            sizes=sizes,
            dtype=dtype,
            iteration=args.iteration,
            overwrite=args.overwrite,
            progress=progress,
        )
    elif args.command == "mcore-to-hf":
        from megatron_opd.convert.mcore_to_hf import convert_mcore_to_hf

        report = convert_mcore_to_hf(
            args.mcore_dir, args.out, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, progress=progress
        )
    else:
        from megatron_opd.convert.extrapolate import extrapolate

        report = extrapolate(
            args.student,
            args.teachers,
            args.alpha,
            args.out,
            max_shard_bytes=args.max_shard_size,
            overwrite=args.overwrite,
            progress=progress,
        )
    return f"{args.command}: wrote {args.out}: {report.summary()}"


def main(argv: list[str] | None = None) -> int:
    from megatron_opd.platform.spawn import WorkerError

    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except CheckpointError as e:
        print(f"opd convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    except WorkerError as e:
        print(f"opd convert {args.command}: error: {_worker_summary(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
