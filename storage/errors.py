"""Errors raised by the storage layer for bad user input."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: a one-line message naming the file or folder and the problem.

    The CLI prints the message and exits non-zero. When several problems were found at once, the
    message names the first and counts the rest; all of them are in `problems`.
    """

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]
