"""``python -m freefuse_bypass_patch``: see kit/cli.py."""

import sys

from .kit.cli import main

if __name__ == "__main__":
    sys.exit(main())
