"""Checkpoint conversion, for those who prefer ``python tools/convert_checkpoint.py``: the same
commands and arguments as ``opd convert`` (hf-to-mcore | mcore-to-hf | extrapolate)."""

from __future__ import annotations

import sys

from megatron_opd.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
