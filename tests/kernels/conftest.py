"""Kernel tests run the Triton kernels on CPU through Triton's interpreter, which must be chosen before the first
``@triton.jit`` of ``megatron_opd.kernels.triton_backend`` is evaluated."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
