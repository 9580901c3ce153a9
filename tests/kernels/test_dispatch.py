"""The backend contract and its choice: both implementations satisfy the ``VocabBackend`` protocol, torch on CPU by
default, OPD_KERNELS forces one, clear errors for impossible choices."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.kernels import token_logprobs, torch_backend, triton_backend
from megatron_opd.kernels.backend import VocabBackend, backend_for, backend_name


def test_both_backends_implement_the_protocol() -> None:
    assert isinstance(torch_backend, VocabBackend) and isinstance(triton_backend, VocabBackend)


def test_default_and_forced_backend(monkeypatch) -> None:
    z = torch.zeros(2, 8)
    monkeypatch.delenv("OPD_KERNELS", raising=False)
    assert backend_name(z) == "torch"
    monkeypatch.setenv("OPD_KERNELS", "Triton")
    assert backend_for(z) is triton_backend  # the interpreter is on in these tests


def test_unknown_backend_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv("OPD_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"^OPD_KERNELS='cuda'"):
        token_logprobs(torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64))


def test_triton_on_cpu_without_interpreter_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv("OPD_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend_for(torch.zeros(2, 8))
