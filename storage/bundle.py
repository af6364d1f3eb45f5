"""The reference bundle: reference latents and friends, cached as safetensors + JSON (never pickle).

A bundle is a folder with two files:

    bundle.safetensors   the tensors (latents, labels, prompt embeddings, kernel parameters, ...)
    bundle.json          content_hash, model_id, created, format_version, the caller's metadata,
                         the tensor index and the sha256 of bundle.safetensors

Both are written atomically, the JSON last: a bundle whose JSON exists and whose safetensors file has
the recorded sha256 is complete. A bundle for other inputs, another model or other settings is stale:
`load_bundle` returns None and the caller rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storage.atomic import atomic_write_bytes, dumps_json

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "BUNDLE_JSON",
    "BUNDLE_TENSORS",
    "bundle_dir",
    "load_bundle",
    "save_bundle",
]

BUNDLE_FORMAT_VERSION = 1
BUNDLE_TENSORS = "bundle.safetensors"
BUNDLE_JSON = "bundle.json"
_RESERVED = ("created", "format_version", "tensors", "safetensors_sha256")


def bundle_dir(cache_root: str | os.PathLike[str], content_hash: str, model_id: str) -> Path:
    """`cache_root/ref-<16 hex>`: a deterministic folder for these inputs and this model."""
    digest = hashlib.sha256(f"{content_hash}\0{model_id}".encode()).hexdigest()[:16]
    return Path(cache_root) / f"ref-{digest}"


def save_bundle(directory: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `directory/bundle.safetensors` then `directory/bundle.json`, each atomically.

    Args:
        directory: bundle folder (created if needed), usually `bundle_dir(...)`.
        tensors: name -> tensor; moved to CPU and made contiguous. Must not be empty.
        meta: JSON-serialisable; must hold `content_hash` and `model_id`. Any other keys (latent shape,
            kernel settings, ...) are stored and can be matched with `load_bundle(extra_key=...)`.

    Returns:
        The bundle folder.
    """
    for key in ("content_hash", "model_id"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ValueError(f"bundle meta needs a non-empty string '{key}'")
    clash = [key for key in _RESERVED if key in meta]
    if clash:
        raise ValueError(f"bundle meta may not set reserved keys: {', '.join(clash)}")
    if not tensors:
        raise ValueError("a bundle needs at least one tensor")
    cpu = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bundle tensor '{name}' is a {type(t).__name__}, not a torch.Tensor")
        cpu[name] = t.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    blob = save_safetensors(cpu)
    record = dict(meta)
    record.update(
        format_version=BUNDLE_FORMAT_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        tensors={
            name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for name, t in cpu.items()
        },
        safetensors_sha256=hashlib.sha256(blob).hexdigest(),
    )
    text = dumps_json(record)  # fail on non-JSON meta before touching the disk
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / BUNDLE_TENSORS, blob)
    atomic_write_bytes(directory / BUNDLE_JSON, text.encode("utf-8"))
    return directory


def load_bundle(
    directory: str | os.PathLike[str],
    *,
    content_hash: str,
    model_id: str,
    extra_key: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Load a bundle if it is complete and matches; otherwise None (the caller rebuilds it).

    Args:
        directory: bundle folder.
        content_hash: must equal the stored `content_hash`.
        model_id: must equal the stored `model_id`.
        extra_key: every item must equal the stored meta item of the same name (compared after a
            JSON round trip, so tuples match lists), e.g. `{"latent_shape": (4, 8, 8), "kernel": {...}}`.

    Returns:
        (tensors on CPU, stored meta) or None when missing, incomplete, corrupt or stale.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != BUNDLE_FORMAT_VERSION:
        return None
    if meta.get("content_hash") != content_hash or meta.get("model_id") != model_id:
        return None
    for key, value in (extra_key or {}).items():
        if key not in meta or _normalised(meta[key]) != _normalised(value):
            return None
    try:
        blob = (directory / BUNDLE_TENSORS).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(blob).hexdigest() != meta.get("safetensors_sha256"):
        return None  # safetensors from another write than this JSON (crash in between) or corrupt
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError):
        return None
    return tensors, meta


def _normalised(value: Any) -> Any:
    return json.loads(dumps_json(value, indent=None))
