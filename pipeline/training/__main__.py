"""`python -m pipeline.training`: see pipeline/training/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":  # not on a plain import (pkgutil.walk_packages smoke imports)
    sys.exit(main())
