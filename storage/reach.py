"""The reach check's record in the run folder (`<out>/reach.json`), copied into `run.json` at the end.

`pipeline.jobs.job.Run.start` writes it once the run has claimed the folder; `Run.finish`, which may run in
another process (a static cluster's `finish`, a Prefect flow's last task), reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from storage.atomic import atomic_write_json

__all__ = ["REACH_FILE", "load_reach", "save_reach"]

REACH_FILE = "reach.json"


def save_reach(out_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write the record (a JSON object with at least `verdict`) atomically to `out_dir/reach.json`."""
    if "verdict" not in record:
        raise ValueError("a reach record needs 'verdict'")
    return atomic_write_json(Path(out_dir) / REACH_FILE, record)


def load_reach(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record in `out_dir/reach.json`, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(out_dir) / REACH_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "verdict" in data else None
