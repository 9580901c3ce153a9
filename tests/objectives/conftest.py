"""Objective tests may run the Triton kernels through Triton's interpreter on CPU, which must be chosen
before Triton is first imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
