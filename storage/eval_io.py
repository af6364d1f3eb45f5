"""Bytes on disk for `augment eval`: reading samples back from a run's shards, writing eval.json and
report.html (atomically, like every other write of the project).

    <run>/eval.json      every number, setting and warning of the evaluation (strict JSON: NaN -> null)
    <run>/report.html    self-contained report (images embedded as base64 PNG)
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.errors import InputError
from storage.shards import SHARDS_DIR, shard_path

__all__ = [
    "EVAL_FILE",
    "REPORT_FILE",
    "iter_shard_samples",
    "read_samples",
    "read_optional_json",
    "read_report_html",
    "write_eval_json",
    "write_report_html",
]

EVAL_FILE = "eval.json"
REPORT_FILE = "report.html"
UTILITY_FILE = "utility.json"


def iter_shard_samples(path: str | os.PathLike[str], keys: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one WebDataset `.tar` as dicts {"__key__", "png": bytes, "json": dict, "cls": int, ...}.

    Only keys in `keys` are returned when given (others are skipped without decoding). Members are
    grouped by key (the part before the first dot of the member name), as webdataset does.
    """
    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if keys is not None and key not in keys:
                    continue
                if current is None:
                    current = {"__key__": key}
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if ext == "json":
                    current["json"] = json.loads(data)
                elif ext == "cls":
                    current["cls"] = int(data)
                else:
                    current[ext] = data
    except (tarfile.TarError, OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable shard ({e})") from e
    if current is not None:
        yield current


def _decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I", "1") else "RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: unreadable PNG ({e})") from e
    return arr[..., None] if arr.ndim == 2 else arr


def read_samples(
    out_dir: str | os.PathLike[str], prefix: str, wanted: Iterable[tuple[int, str]], *, folder: str = SHARDS_DIR
) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    """Images of the wanted samples of a run, read from `{folder}/{prefix}-{shard:06d}.tar` (`shards/`, or
    `rejected/` for the audit shards).

    Args:
        wanted: (shard id, key) pairs; each shard is opened once.

    Returns:
        (keys in the order found, uint8 images [n, H, W, C], per-sample JSON metadata).

    Raises:
        InputError: a shard is missing or unreadable, or a wanted key is not in its shard.
    """
    by_shard: dict[int, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(int(shard), set()).add(str(key))
    keys: list[str] = []
    images: list[np.ndarray] = []
    metas: list[dict[str, Any]] = []
    for shard in sorted(by_shard):
        path = shard_path(out_dir, prefix, shard, folder=folder)
        if not path.is_file():
            raise InputError(f"{path}: shard listed in the manifest is missing")
        found = set()
        for sample in iter_shard_samples(path, by_shard[shard]):
            if "png" not in sample:
                raise InputError(f"{path}: sample {sample['__key__']} has no png member")
            keys.append(sample["__key__"])
            images.append(_decode_png(sample["png"], f"{path}:{sample['__key__']}.png"))
            metas.append(sample.get("json", {}))
            found.add(sample["__key__"])
        missing = by_shard[shard] - found
        if missing:
            raise InputError(f"{path}: {len(missing)} sample(s) of the manifest are missing, e.g. {min(missing)}")
    if not images:
        return keys, np.zeros((0, 0, 0, 0), dtype=np.uint8), metas
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(f"{out_dir}: samples have different image shapes {sorted(shapes)}")
    return keys, np.stack(images), metas


def _finite(obj: Any) -> Any:
    """NaN/inf floats -> None so eval.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_eval_json(out_dir: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write `out_dir/eval.json` atomically (sorted keys; non-finite numbers become null)."""
    return atomic_write_json(Path(out_dir) / EVAL_FILE, _finite(result))


def write_report_html(out_dir: str | os.PathLike[str], html: str) -> Path:
    """Write `out_dir/report.html` atomically (UTF-8)."""
    return atomic_write_bytes(Path(out_dir) / REPORT_FILE, html.encode("utf-8"))


def read_optional_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON object written by this project (eval.json, utility.json), or None if the file is absent."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: unreadable JSON ({exc})") from exc


def read_report_html(out_dir: str | os.PathLike[str]) -> str | None:
    """`out_dir/report.html` as text, or None if there is no report yet."""
    p = Path(out_dir) / REPORT_FILE
    return p.read_text(encoding="utf-8") if p.is_file() else None
