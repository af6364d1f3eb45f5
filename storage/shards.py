"""WebDataset shards: written atomically, byte-reproducible, with a done marker per shard.

Layout under the output folder:

    shards/{prefix}-{shard:06d}.tar         the shard (WebDataset: members `<key>.<ext>`)
    shards/{prefix}-{shard:06d}.tar.done    JSON marker: sample count, size and sha256 of the tar
    rejected/{prefix}_rejected-{shard:06d}.tar   audit shards of the samples the filter rejected
                                                 (`--keep-rejected`), apart so `shards/*.tar` never has them

A shard is streamed to `<name>.tmp-<run token>-<rand>`, fsynced and renamed; the marker is written after the
rename. So a `.tar` is always complete, and a marker vouches for the exact bytes of its `.tar`. Identical
samples give identical bytes in any run or process: every tar header field is fixed (mtime 0,
uid/gid 0, fixed user/group names, mode 0444, USTAR format) and JSON is serialised with sorted keys.

Member encoding follows webdataset's conventions: bytes as they are, `str` as UTF-8, `json`
dict -> UTF-8 JSON, `cls` int -> ASCII digits, `*.npy` array/tensor -> `.npy` bytes, `png` PIL image or
uint8 array -> PNG, `txt` str -> UTF-8 (the caption of an image-text pair: samples of prompted runs carry
their prompt there, so `WebDataset(...).decode().to_tuple("png", "txt")` gives (image, prompt)).
Pickle-based extensions are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.writer import TarWriter, default_handlers

from storage.atomic import TMP_MARK, atomic_write_json, json_default, tmp_name, tmp_token

__all__ = [
    "REJECTED_DIR",
    "SHARDS_DIR",
    "clean_partial",
    "done_shard_ids",
    "encode_png",
    "encode_sample",
    "is_done",
    "mark_done",
    "marker_path",
    "read_marker",
    "shard_name",
    "shard_path",
    "write_shard",
]

SHARDS_DIR = "shards"
#: Rejected samples' audit shards: a folder of their own, so a `shards/*.tar` pattern never trains on them.
REJECTED_DIR = "rejected"
MARKER_SUFFIX = ".done"
MARKER_VERSION = 1
# Fixed tar header fields: the only sources of non-determinism TarWriter would otherwise have.
_TAR_FIXED = {"user": "bigdata", "group": "bigdata", "mode": 0o444, "mtime": 0.0, "format": "USTAR_FORMAT"}
_PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
_CHUNK = 1 << 20


def shard_name(prefix: str, shard_id: int) -> str:
    """`{prefix}-{shard_id:06d}.tar`."""
    if not prefix or "/" in prefix or "\\" in prefix:
        raise ValueError(f"shard prefix must be a plain name, got {prefix!r}")
    if shard_id < 0:
        raise ValueError(f"shard id must be >= 0, got {shard_id}")
    return f"{prefix}-{shard_id:06d}.tar"


def shard_path(out_dir: str | os.PathLike[str], prefix: str, shard_id: int, *, folder: str = SHARDS_DIR) -> Path:
    """`out_dir/{folder}/{prefix}-{shard_id:06d}.tar` (`folder`: `shards`, or `rejected` for audit shards)."""
    return Path(out_dir) / folder / shard_name(prefix, shard_id)


def marker_path(out_dir: str | os.PathLike[str], prefix: str, shard_id: int, *, folder: str = SHARDS_DIR) -> Path:
    """`out_dir/{folder}/{prefix}-{shard_id:06d}.tar.done`."""
    return Path(out_dir) / folder / (shard_name(prefix, shard_id) + MARKER_SUFFIX)


def done_shard_ids(out_dir: str | os.PathLike[str], prefix: str, *, folder: str = SHARDS_DIR) -> list[int]:
    """Ids of the shards that have a done marker in `out_dir/{folder}`, ascending (listed, not verified:
    `is_done` checks that a marker vouches for its `.tar`). Costs what the folder holds, not the plan."""
    directory = Path(out_dir) / folder
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6,}})\.tar{re.escape(MARKER_SUFFIX)}$")
    try:
        names = [entry.name for entry in os.scandir(directory)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for name in names if (m := pattern.match(name)))


# ---------------------------------------------------------------------------------------------- encoding


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of 8-bit pixels: [H, W] or [H, W, 1] grayscale, [H, W, 3] RGB. Deterministic
    (zlib level 6, no metadata): the same pixels give the same bytes."""
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"PNG pixels must be [H, W], [H, W, 1] or [H, W, 3], got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="L" if arr.ndim == 2 else "RGB").save(
        buf, format="PNG", compress_level=6
    )
    return buf.getvalue()


def _json_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=json_default).encode("utf-8")


def _npy_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return default_handlers["npy"](np.ascontiguousarray(np.asarray(value)))


def _text_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"a text member must be a str, got {type(value).__name__}")
    return value.encode("utf-8")  # no BOM, verbatim: webdataset decodes it back with UTF-8


def _cls_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"cls must be an int, got {type(value).__name__}")
    return str(int(value)).encode("ascii")


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Validate a sample dict and encode every member to bytes (webdataset conventions).

    Raises:
        ValueError: bad `__key__` (missing, empty, with a dot or slash), a bad member name, a member
            that cannot be encoded, a pickle-based extension, or a sample with no members.
    """
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample needs a non-empty string __key__, got {key!r}")
    if "." in key or "/" in key or "\\" in key:
        raise ValueError(f"sample key {key!r} may not contain dots or slashes")
    out: dict[str, Any] = {"__key__": key}
    for name, value in sample.items():
        if name == "__key__":
            continue
        if name.startswith("_"):
            raise ValueError(f"sample {key}: member {name!r} starts with '_' and would not be written")
        if not _MEMBER_RE.match(name) or name.endswith("."):
            raise ValueError(f"sample {key}: bad member name {name!r}")
        ext = name.rsplit(".", 1)[-1].lower()
        if ext in _PICKLE_EXTENSIONS:
            raise ValueError(f"sample {key}: member {name!r} would be pickled; use npy, json or safetensors")
        try:
            if ext in ("json", "jsn"):
                data = _json_bytes(value)
            elif ext == "npy":
                data = _npy_bytes(value)
            elif ext in ("cls", "cls2", "index", "count"):
                data = _cls_bytes(value)
            elif ext in ("txt", "text"):
                data = _text_bytes(value)
            elif isinstance(value, bytes | bytearray | memoryview):
                data = bytes(value)
            elif isinstance(value, str):
                data = value.encode("utf-8")
            elif ext in default_handlers:
                data = default_handlers[ext](value)
            else:
                raise ValueError(f"no encoder for {type(value).__name__}")
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"sample {key}: cannot encode member {name!r} ({e})") from e
        out[name] = data
    if len(out) == 1:
        raise ValueError(f"sample {key} has no members")
    return out


class _HashingWriter:
    """File wrapper that hashes and counts what the tar stream writes."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


# ------------------------------------------------------------------------------------------------ writing


def write_shard(
    out_dir: str | os.PathLike[str],
    prefix: str,
    shard_id: int,
    samples: Iterable[dict[str, Any]],
    *,
    write_marker: bool = True,
    marker_info: dict[str, Any] | None = None,
    folder: str = SHARDS_DIR,
) -> Path:
    """Stream `samples` into `out_dir/{folder}/{prefix}-{shard_id:06d}.tar` atomically.

    Each sample is a webdataset dict: `__key__` (unique, no dots or slashes) and members such as
    `png` (bytes), `json` (dict or bytes), `cls` (int), `latent.npy` (array). Members are written in
    sorted order per sample, samples in the order given.

    On any error (including one raised by the `samples` iterator) the temporary file is removed and
    neither the `.tar` nor its marker is written. On success the marker is written last (unless
    `write_marker=False`), holding the sample count, size, sha256 and `marker_info`. Write anything
    the marker should vouch for (e.g. the shard's manifest part) before calling this.

    Returns:
        The path of the `.tar`.
    """
    final = shard_path(out_dir, prefix, shard_id, folder=folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    keys: set[str] = set()
    try:
        with open(tmp, "xb") as f:
            hashing = _HashingWriter(f)
            writer = TarWriter(hashing, encoder=False, **_TAR_FIXED)
            try:
                for sample in samples:
                    encoded = encode_sample(sample)
                    key = encoded["__key__"]
                    if key in keys:
                        raise ValueError(f"{final.name}: duplicate sample key {key!r}")
                    keys.add(key)
                    writer.write(encoded)
            finally:
                writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if write_marker:
        _write_marker(final, count=len(keys), size=hashing.size, sha256=hashing.sha256.hexdigest(), info=marker_info)
    return final


def _write_marker(tar: Path, *, count: int | None, size: int, sha256: str, info: dict[str, Any] | None) -> Path:
    record: dict[str, Any] = dict(info or {})
    record.update(shard=tar.name, size=size, sha256=sha256, marker_version=MARKER_VERSION)
    if count is not None:
        record["count"] = count
    return atomic_write_json(tar.with_name(tar.name + MARKER_SUFFIX), record)


def _file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def mark_done(out_dir: str | os.PathLike[str], prefix: str, shard_id: int, info: dict[str, Any]) -> Path:
    """Write the done marker of an existing shard (hashes the `.tar`); `info` is stored with it.

    `write_shard` does this itself; call it only after `write_shard(..., write_marker=False)`.
    `info` should carry `count` (samples in the shard).
    """
    tar = shard_path(out_dir, prefix, shard_id)
    if not tar.is_file():
        raise FileNotFoundError(f"{tar}: cannot mark a missing shard as done")
    size, sha = _file_sha256(tar)
    count = info.get("count")
    return _write_marker(tar, count=count, size=size, sha256=sha, info=info)


def read_marker(out_dir: str | os.PathLike[str], prefix: str, shard_id: int) -> dict[str, Any] | None:
    """The marker's JSON, or None if it is missing or unreadable."""
    try:
        record = json.loads(marker_path(out_dir, prefix, shard_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_done(out_dir: str | os.PathLike[str], prefix: str, shard_id: int, *, verify_hash: bool = True) -> bool:
    """True only if the marker exists and the `.tar` has the recorded size (and sha256)."""
    record = read_marker(out_dir, prefix, shard_id)
    if record is None:
        return False
    tar = shard_path(out_dir, prefix, shard_id)
    try:
        if tar.stat().st_size != record.get("size"):
            return False
    except OSError:
        return False
    if not verify_hash:
        return True
    try:
        return _file_sha256(tar)[1] == record.get("sha256")
    except OSError:
        return False


def clean_partial(out_dir: str | os.PathLike[str], *, keep_token: str | None = None) -> list[Path]:
    """Remove `*.tmp-*` files left by crashed writers in `out_dir`, `shards/`, `rejected/` and `manifest/`:
    every one whose writer's token (`storage.atomic.tmp_name`) is not `keep_token`, the current run's.

    Call it once the run has claimed the folder (`RunFolder.clean_partial`): the claim gave the run a fresh
    token, so every temporary file of an earlier run goes, whatever pid its writer had.

    Returns:
        The removed paths.
    """
    out_dir = Path(out_dir)
    removed = []
    for folder in (out_dir, out_dir / SHARDS_DIR, out_dir / REJECTED_DIR, out_dir / "manifest"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{TMP_MARK}*")):
            if not path.is_file() or (keep_token is not None and tmp_token(path.name) == keep_token):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
