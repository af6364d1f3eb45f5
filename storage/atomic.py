"""Atomic file writes: temporary name in the same directory, fsync, `os.replace`."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "dumps_json",
    "set_run_token",
    "tmp_name",
    "tmp_token",
]

TMP_MARK = ".tmp-"


#: The token of the run this process writes for (`storage.run_folder.RunFolder.claim`/`join`); None: no run.
_run_token: str | None = None


def set_run_token(token: str | None) -> None:
    """Name this process's temporary files after the run it writes for (`RunFolder`: a crashed run's files
    are told apart by their token, not by a pid a restarted container may reuse)."""
    global _run_token
    _run_token = token


def tmp_token(name: str) -> str | None:
    """The writer's token in `<name>.tmp-<token>-<random>` (None if `name` is not a temporary file)."""
    _, mark, rest = name.rpartition(TMP_MARK)
    return rest.rsplit("-", 1)[0] if mark and "-" in rest else None


def tmp_name(path: Path) -> Path:
    """`<name>.tmp-<token>-<random>` next to `path` (the run's token, else `p<pid>`): unique per writer, never
    matches `*.tar`/`*.json`."""
    token = _run_token or f"p{os.getpid()}"
    return path.with_name(f"{path.name}{TMP_MARK}{token}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a temporary file for binary writing; on success fsync and rename it to `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def dumps_json(obj: Any, *, indent: int | None = 2) -> str:
    """Deterministic JSON: sorted keys, numpy scalars/arrays converted, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=indent, default=json_default, ensure_ascii=False) + "\n"


def json_default(obj: Any) -> Any:
    """`json.dumps` fallback for numpy scalars/arrays, tuples-as-lists and paths."""
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write `obj` as deterministic UTF-8 JSON to `path` atomically and return the path."""
    return atomic_write_bytes(path, dumps_json(obj, indent=indent).encode("utf-8"))
