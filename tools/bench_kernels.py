#!/usr/bin/env python
"""Same as ``opd bench kernels``: see ``megatron_opd/bench/kernels.py`` and ``docs/kernels.md``."""

import sys

from megatron_opd.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
