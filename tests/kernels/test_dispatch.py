"""Backend choice: torch on CPU by default, OPD_KERNELS forces one, clear errors for impossible choices."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.config.errors import ConfigError
from megatron_opd.kernels import token_logprobs
from megatron_opd.kernels.dispatch import backend_for, backend_name


def test_default_and_forced_backend(monkeypatch) -> None:
    z = torch.zeros(2, 8)
    monkeypatch.delenv("OPD_KERNELS", raising=False)
    assert backend_name(z) == "torch"
    monkeypatch.setenv("OPD_KERNELS", "Triton")
    assert backend_for(z).__name__.endswith("triton_backend")  # the interpreter is on in these tests


def test_unknown_backend_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv("OPD_KERNELS", "cuda")
    with pytest.raises(ConfigError) as err:
        token_logprobs(torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64))
    assert err.value.key == "OPD_KERNELS"


def test_triton_on_cpu_without_interpreter_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv("OPD_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError) as err:
        backend_for(torch.zeros(2, 8))
    assert "TRITON_INTERPRET=1" in str(err.value)


def test_group_size_takes_the_group_path_in_the_topk_tests() -> None:
    """The Triton top-k tests exercise group selection, not only the narrow-shard fallback."""
    from megatron_opd.kernels.triton_backend import _group_size

    assert _group_size(61, 3, 16) == 8 and _group_size(200, 8, 16) == 8 and _group_size(17, 17, 16) == 0
    assert _group_size(151936, 64, 4096) == 64 and _group_size(37984, 64, 4096) == 32
