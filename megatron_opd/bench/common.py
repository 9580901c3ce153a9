"""Helpers the benchmarks share: timing, peak memory (CUDA allocator, or live tensor bytes on CPU),
device naming, list arguments and JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active and still alive (CPU memory accounting).

    An op's output storage counts as new unless it is the storage of one of the op's inputs (views, in-place and
    ``out=`` ops); it stops counting when the storage is freed (``weakref.finalize`` on the storage object, which
    torch keeps alive exactly as long as the C++ storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue
            inputs.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.nbytes())
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with LiveTensorBytes() as tracker:
        fn()
    return int(tracker.peak)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def list_arg(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [t for t in text.split(",") if t]
        bad = [t for t in names if t not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(choices)}")
        return names

    return parse


def write_records(records: Sequence[Any], path: str) -> None:
    """The benchmark's records (dataclasses) as a JSON list at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in records], f, indent=1)
    print(f"wrote {len(records)} records to {path}")
