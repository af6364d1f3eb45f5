"""`python -m pipeline.training`: see pipeline/training/cli.py."""

import sys

from .cli import main

sys.exit(main())
