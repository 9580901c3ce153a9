"""What is installed and what the device offers: versions, capabilities, the GPU."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any

import torch

from megatron_opd.selftest.report import Skip

# torch releases this package supports (pyproject.toml): [first, last]
TORCH_SUPPORTED = ((2, 8), (2, 15))
# distribution name -> what it gives (optional ones are reported, never required)
PACKAGES = {
    "triton": "compiled kernels",
    "megatron-core": "models and parallelism",
    "transformers": "HF models, rollout engine",
    "transformer-engine": "TE layer spec",
    "flash-attn": "flash attention package",
    "sglang": "rollout servers",
    "vllm": "rollout engine",
    "ray": "worker groups",
    "omegaconf": "configs",
    "math-verify": "math rewards",
}


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def nccl_version() -> str:
    """``2.21.5``: torch answers a tuple (an int encoding it in old releases)."""
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def gather(device: torch.device) -> dict[str, Any]:
    """Versions and capabilities, as reported in the table's first rows and the JSON record."""
    from megatron_opd.platform import compat

    varlen = compat.VARLEN_ATTENTION
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "packages": {name: version_of(name) for name in PACKAGES},
        "varlen_attn": varlen.describe() if varlen else "absent: packed attention runs one SDPA call per sequence",
        "device": str(device),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=nccl_version(),
            gpus=torch.cuda.device_count(),
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
        )
    return env


def check_torch_supported() -> tuple[str, dict[str, Any]]:
    release = torch_release(torch.__version__)
    (lo_major, lo_minor), (hi_major, hi_minor) = TORCH_SUPPORTED
    supported = f"{lo_major}.{lo_minor} – {hi_major}.{hi_minor}"
    assert TORCH_SUPPORTED[0] <= release <= TORCH_SUPPORTED[1], (
        f"torch {torch.__version__} is outside the supported {supported}: install a torch in that range"
    )
    return f"torch {torch.__version__} (supported: {supported})", {"torch": torch.__version__}


def check_device(device: torch.device) -> tuple[str, dict[str, Any]]:
    """The requested device exists; on a GPU: its name, memory, capability, bf16 and NCCL."""
    if device.type == "cpu":
        return f"cpu, {torch.get_num_threads()} threads", {}
    assert torch.cuda.is_available(), (
        "--device cuda, but torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES? driver?)"
    )
    env = gather(device)
    assert env["bf16"], f"{env['gpu']} has no bf16 support: the GPU path trains in bf16"
    free, total = torch.cuda.mem_get_info(0)
    return (
        f"{env['gpus']} x {env['gpu']} ({env['gpu_memory_gib']} GiB, {free / 2**30:.0f} GiB free, sm{env['compute_capability']}), "
        f"CUDA {env['cuda']}, NCCL {env['nccl']}",
        {"free_bytes": free, "total_bytes": total},
    )


def check_triton(device: torch.device) -> tuple[str, dict[str, Any]]:
    if device.type != "cuda":
        raise Skip("Triton kernels compile for CUDA only (CPU runs the chunked torch path)")
    version = version_of("triton")
    assert version is not None, "triton is not installed: pip install 'triton>=3.4'"
    assert tuple(int(x) for x in version.split(".")[:2]) >= (3, 4), (
        f"triton {version}: the kernels need >= 3.4 (tl.topk)"
    )
    return f"triton {version}", {}
