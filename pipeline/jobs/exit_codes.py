"""`augment`'s exit codes (README, "Exit codes"; shown by `augment --help`): what the end of a job means as
an exit status, shared by the CLI (`pipeline.cli`) and the static-cluster steps (`pipeline.jobs.static_cluster`)."""

EXIT_DELIVERED = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_FINISHED_SHORT = 3
EXIT_INTERRUPTED = 130  # typer's, for KeyboardInterrupt (128 + SIGINT)
EXIT_CODES = {
    EXIT_DELIVERED: "delivered: --n samples kept and written (or a short run accepted by --allow-shortfall)",
    EXIT_FAILED: "failed unexpectedly (a traceback; e.g. a worker process crashed): rerun the same command to resume",
    EXIT_BAD_INPUT: "bad input or settings: one 'error:' line naming the file or flag and what to do",
    EXIT_FINISHED_SHORT: "finished short: fewer than --n kept; the samples, manifest and run.json are written",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): rerun the same command to resume",
}

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CODES",
    "EXIT_DELIVERED",
    "EXIT_FAILED",
    "EXIT_FINISHED_SHORT",
    "EXIT_INTERRUPTED",
]
