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
