"""Each CUDA assumption of megatron-core that the CPU compatibility layer redirects, tested on its
own so a megatron-core or torch upgrade that changes one is caught (see platform/cpu_compat.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_opd.platform import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive where CUDA exists")


@pytest.fixture(scope="module", autouse=True)
def active() -> None:
    assert cpu_compat.activate()
    assert cpu_compat.activate()  # idempotent


def test_cuda_devices_become_cpu_in_factories_and_methods() -> None:
    dev = torch.cuda.current_device()
    assert dev == 0
    for t in (
        torch.empty(2, device="cuda"),
        torch.zeros(2, device=dev),
        torch.arange(3, device=torch.device("cuda", 0)),
        torch.ones(2).new_zeros(3, device="cuda"),
        torch.ones(2).to("cuda"),
        torch.ones(2).to(device=dev),
        torch.ones(2).cuda(),
    ):
        assert t.device.type == "cpu"


def test_device_rewrite_reaches_backward() -> None:
    class Alloc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2 + torch.zeros(g.shape, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    Alloc.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_tensor_type_names_for_megatron_optimizer() -> None:
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_cuda_rng_maps_to_cpu_generator() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    torch.cuda.manual_seed(123)
    a = torch.rand(2)
    state = torch.cuda.get_rng_state()
    b = torch.rand(2)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(2), b)
    s = mc_random._get_cuda_rng_state(clone=True)
    c = torch.rand(2)
    mc_random._set_cuda_rng_state(s)
    assert torch.equal(torch.rand(2), c)
    assert not torch.equal(a, b)


def test_rng_tracker_fork_is_isolated() -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-stream", 7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("test-stream"):
        torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)


def test_streams_and_memory_queries_answer() -> None:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pass
    torch.cuda.synchronize()
    assert torch.cuda.device_count() == 1
    assert torch.cuda.max_memory_allocated() == 0


def test_default_device_context_applies_to_patched_factories() -> None:
    # In a fresh process, so the torch's cache of default-device factories is first built after
    # activate() (as in a spawned rank building a meta-device model).
    code = (
        "import torch\n"
        "from megatron_opd.platform import cpu_compat\n"
        "assert cpu_compat.activate()\n"
        "with torch.device('meta'):\n"
        "    assert torch.empty(2).is_meta and torch.zeros(2, device='cuda').is_cpu\n"
        "    assert torch.nn.Linear(2, 2).weight.is_meta\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
