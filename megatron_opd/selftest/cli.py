"""``opd selftest [--device cuda|cpu] [--json PATH]``: check a node before a long job.

Reports versions and capabilities, then runs each check (PASS / FAIL / SKIP with the reason): the
supported torch range, the device, the vocabulary kernels against float64, tiny Qwen3 and
Qwen3-MoE Megatron models (logits equal ``transformers``, packed sequences equal unpacked,
forward + backward in the training dtype), a student's GPU memory offloaded and restored between
steps, and the trainer -> rollout weight broadcast. Exit code 0
only when nothing failed. About 2 minutes on one GPU; see ``docs/gpu.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from megatron_opd.selftest.report import Outcome, run_check, table, write_json


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd selftest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda where CUDA is available")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the environment and every outcome here")
    p.add_argument("--only", default=None, metavar="PREFIX", help="run only the checks whose name starts with PREFIX")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first queried: the CPU path throughout
    import torch

    from megatron_opd.platform.distributed import (
        DistEnv,
        ParallelSizes,
        free_port,
        init_distributed,
        init_model_parallel,
        shutdown,
    )
    from megatron_opd.selftest import environment, kernels, models, offload, weight_sync

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env = environment.gather(device)
    print(f"opd selftest on {device}: python {env['python']}, torch {env['torch']}")
    for name, version in env["packages"].items():
        print(f"  {name:<18} {version or '-'}  ({environment.PACKAGES[name]})")
    print(f"  {'varlen_attn':<18} {env['varlen_attn']}")
    for key in ("gpu", "gpus", "gpu_memory_gib", "compute_capability", "cuda", "cudnn", "nccl"):
        if key in env:
            print(f"  {key:<18} {env[key]}")
    print()

    checks: dict[str, Callable[[], tuple[str, dict]]] = {
        "environment/torch version": environment.check_torch_supported,
        "environment/device": lambda: environment.check_device(device),
        "environment/triton": lambda: environment.check_triton(device),
    }
    outcomes: list[Outcome] = []
    ready = device.type == "cpu" or torch.cuda.is_available()
    if ready:
        init_distributed(DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single"), timeout_s=300)
        init_model_parallel(ParallelSizes())
        checks.update(kernels.checks(device))
        tiny = models.TinyModels(device, Path(tempfile.mkdtemp(prefix="opd_selftest_")))
        checks.update(models.checks(tiny))
        checks.update(offload.checks(lambda: tiny.hf_dir("dense"), device))
        checks["weight sync/round trip"] = weight_sync.round_trip(device)
    try:
        for name, check in checks.items():
            if args.only and not name.startswith(args.only):
                continue
            outcome = run_check(name, check)
            outcomes.append(outcome)
            print(next(table([outcome])), flush=True)
    finally:
        if ready:
            shutdown()
    print()
    print("\n".join(table(outcomes)))
    if args.json:
        write_json(args.json, env, outcomes)
        print(f"wrote {args.json}")
    return 1 if any(o.status == "FAIL" for o in outcomes) else 0
