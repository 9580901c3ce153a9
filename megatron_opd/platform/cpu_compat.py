"""Let megatron-core run on a machine without CUDA.

megatron-core hard-codes CUDA in places that have a CPU meaning (see
``docs/gpu.md``). :func:`activate` redirects each of them, once per
process, and only when ``torch.cuda.is_available()`` is False; on a GPU it does nothing. Every
redirection is listed here and tested in ``tests/unit/test_cpu_compat.py`` so a megatron-core
upgrade that changes them is caught:

1. ``device="cuda"`` / ``device=torch.cuda.current_device()`` (an int) in tensor factories
   (``torch.empty``, ``torch.zeros``, ...), ``Tensor.new_*``, ``Tensor.to`` and ``Tensor.cuda``:
   the device argument is rewritten to CPU (process-wide, every thread, backward included);
   a ``with torch.device(...)`` default-device context still applies to them.
2. CUDA RNG state (``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and megatron's
   ``_get_cuda_rng_state``/``_set_cuda_rng_state``): mapped to the CPU default generator.
3. ``torch.cuda.current_device``/``device_count``/``synchronize``/``Stream``/memory queries:
   CPU answers (device 0, one device, no-op, a dummy stream, zero bytes).
4. ``Tensor.type()`` (no arguments) answers ``torch.cuda.FloatTensor`` style names for CPU
   tensors: megatron's (distributed) optimizer dispatches on those strings.
5. The MoE ``alltoall`` dispatcher creates a CUDA stream: configs choose ``allgather`` on CPU
   (done in :mod:`megatron_opd.models.qwen3`), not patched here.

What differs between dependency versions on every device (megatron's ``te_general_gemm`` without
Transformer Engine, torch's ``varlen_attn`` signatures) is bridged in
:mod:`megatron_opd.platform.compat`, whose ``activate`` also switches this layer on.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import torch

_ACTIVE = False
_LOCK = threading.Lock()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device
    return isinstance(device, int) and not isinstance(device, bool)


# Tensor factories that take a ``device`` argument. Patched as module attributes (not with a
# TorchFunctionMode: modes are thread-local and popped while they run, so code executed by
# ``backward`` -- megatron's autograd functions allocate in their backward -- would escape one).
_FACTORIES = (
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "arange", "range", "linspace", "logspace", "eye", "tensor", "as_tensor", "asarray", "rand", "rand_like",
    "randn", "randn_like", "randint", "randint_like", "randperm", "scalar_tensor", "tril_indices", "triu_indices",
)  # fmt: skip


def _device_to_cpu(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__opd_cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def _patch_tensor_methods() -> None:
    original_to = torch.Tensor.to
    original_type = torch.Tensor.type

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    def cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **_: Any) -> torch.Tensor:
        return self

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and not result.startswith("torch.cuda."):
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    torch.Tensor.to = to  # type: ignore[method-assign]
    torch.Tensor.cuda = cuda  # type: ignore[method-assign]
    torch.Tensor.type = type_  # type: ignore[method-assign]
    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
        setattr(torch.Tensor, name, _device_to_cpu(getattr(torch.Tensor, name)))


def _patch_factories() -> None:
    # ``with torch.device("meta")`` (megatron's and transformers' meta-device init) matches the
    # builtin factories against a set it builds, and caches, on first use: build it now, while
    # ``torch.empty`` & co. are still the builtins the wrappers below end up calling.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name, None)
        if fn is not None and not getattr(fn, "__opd_cpu_compat__", False):
            setattr(torch, name, _device_to_cpu(fn))


class _CpuStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: work is synchronous, so it is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.synchronize = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.Stream = _CpuStream
    cuda.current_stream = lambda device=None: _CpuStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_device = lambda device: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.empty_cache = lambda: None


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mc_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def activate() -> bool:
    """Switch the compatibility layer on for this process if CUDA is absent.

    Returns True when it is (now or already) active. Idempotent and thread-safe.
    """
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ACTIVE:
            return True
        _patch_torch_cuda()
        _patch_factories()
        _patch_tensor_methods()
        _patch_megatron()
        _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE
