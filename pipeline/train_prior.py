"""`python -m pipeline.train_prior` (kept for existing commands): the training package's CLI.

The code lives in `pipeline/training/` (config and presets, augmentation, data, loop machinery, stages,
evaluation, model card, CLI); see `python -m pipeline.training --help`.
"""

import sys

from pipeline.training.cli import EXIT_INTERRUPTED, main

__all__ = ["EXIT_INTERRUPTED", "main"]

if __name__ == "__main__":
    sys.exit(main())
