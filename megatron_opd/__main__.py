import sys

from megatron_opd.cli import main

sys.exit(main())
