"""The strength pilot's record on disk: a cache keyed by hashes, and a copy in the run folder.

The record is a JSON object with at least `key` (sha256 of the references' content hash, the model id and
the settings the pilot depends on) and `chosen` (the strength). `cache_root/pilot/<key>.json` lets any
job with the same references, model and settings skip the pilot; `<out>/pilot.json` pins the choice of a
run so that a resume uses it even after the cache is cleared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from storage.atomic import atomic_write_json

__all__ = ["PILOT_FILE", "load_pilot", "pilot_cache_path", "save_pilot"]

PILOT_FILE = "pilot.json"


def pilot_cache_path(cache_root: str | os.PathLike[str], key: str) -> Path:
    """`cache_root/pilot/<key>.json` (the key is a hex digest)."""
    if not key or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"pilot key must be a lowercase hex digest, got {key!r}")
    return Path(cache_root) / "pilot" / f"{key}.json"


def load_pilot(path: str | os.PathLike[str], key: str) -> dict[str, Any] | None:
    """The record at `path` if it exists, parses, and was made for `key`; else None (a stale or broken
    record is ignored, never trusted: the pilot then runs again)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("chosen"), int | float):
        return None
    return data


def save_pilot(path: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write the record atomically (it must carry `key` and `chosen`)."""
    if "key" not in record or "chosen" not in record:
        raise ValueError("a pilot record needs 'key' and 'chosen'")
    return atomic_write_json(path, record)
