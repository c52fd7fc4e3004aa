"""``python -m moe_testbed`` (and ``torchrun ... -m moe_testbed train ...``): the command line."""

import sys

from moe_testbed.cli import main

if __name__ == "__main__":
    sys.exit(main())
