"""The top room: `augment`'s commands (`commands`: the job, `demo`, `eval`, `utility`) and the options
generated from `AugmentConfig` (`options`). Imports every room below; nothing of the pipeline imports it.

What `flows.cli` and users use is re-exported here (`from pipeline.cli import app`); `python -m
pipeline.cli` runs every command but `flow` (the entry point is `flows.cli:main`).
"""

from ..jobs.exit_codes import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_DELIVERED,
    EXIT_FAILED,
    EXIT_FINISHED_SHORT,
    EXIT_INTERRUPTED,
)
from .commands import (
    EXIT_CODES_EPILOG,
    app,
    build_config,
    fail,
    job_command_signature,
    make_app,
    summary_lines,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CODES",
    "EXIT_CODES_EPILOG",
    "EXIT_DELIVERED",
    "EXIT_FAILED",
    "EXIT_FINISHED_SHORT",
    "EXIT_INTERRUPTED",
    "app",
    "build_config",
    "fail",
    "job_command_signature",
    "make_app",
    "summary_lines",
]
