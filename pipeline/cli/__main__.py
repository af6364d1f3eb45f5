"""`python -m pipeline.cli`: every command but `flow` (the entry point is `flows.cli`)."""

from .commands import app

if __name__ == "__main__":  # not on a plain import (pkgutil.walk_packages smoke imports)
    app()
