"""Kernel tests run the Triton kernels on CPU through Triton's interpreter, which must be chosen before the first
``@triton.jit`` of ``megatron_opd.kernels.triton_backend`` is evaluated."""

import os
import warnings

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    """The interpreter evaluates both branches of ``tl.where`` with numpy (``0 * inf`` in the unused one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, module="triton")
        yield


@pytest.fixture(params=["torch", "triton", "triton_rows4"])
def backend(request, monkeypatch) -> str:
    """Forces the backend; Triton runs in the interpreter with 16-wide tiles (several tiles and a ragged one), with
    one or four rows per program."""
    name = request.param.split("_")[0]
    monkeypatch.setenv("OPD_KERNELS", name)
    monkeypatch.setenv("OPD_TRITON_BLOCK_V", "16")
    monkeypatch.setenv("OPD_TRITON_ROWS", "4" if request.param.endswith("rows4") else "1")
    return name
