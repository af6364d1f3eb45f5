"""The warnings of an evaluation: each listed once, with every place it came from."""

from __future__ import annotations

import logging

log = logging.getLogger("pipeline.evaluation.run_eval")

__all__ = ["Warnings"]


class Warnings:
    """Warnings in order of first appearance; the same message from several places is listed once."""

    def __init__(self) -> None:
        self._where: dict[str, list[str]] = {}

    def add(self, message: str, where: str | None = None) -> None:
        places = self._where.get(message)
        if places is None:
            self._where[message] = places = []
            log.warning("%s%s", f"{where}: " if where else "", message)
        if where and where not in places:
            places.append(where)

    def extend(self, messages: list[str], where: str | None = None) -> None:
        for m in messages:
            self.add(m, where)

    @property
    def items(self) -> list[str]:
        return [f"{', '.join(places)}: {m}" if places else m for m, places in self._where.items()]
