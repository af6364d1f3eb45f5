"""Every byte on disk: reference folders, the reference bundle, shards, manifest, run record.

Writes are atomic (temporary name in the same folder, fsync, rename; `atomic_write_json`,
`atomic_write_bytes` and `atomic_open` for any other file the project writes); bad user input raises
`InputError` with one line naming the file and the problem.

Names are imported lazily, so `import storage.manifest` (or `storage.run_record`) does not pull in
torch and Pillow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "InputError": "storage.errors",
    "atomic_open": "storage._atomic",
    "atomic_write_bytes": "storage._atomic",
    "atomic_write_json": "storage._atomic",
    "References": "storage.references",
    "read_references": "storage.references",
    "bundle_dir": "storage.bundle",
    "load_bundle": "storage.bundle",
    "save_bundle": "storage.bundle",
    "clean_partial": "storage.shards",
    "encode_png": "storage.shards",
    "encode_sample": "storage.shards",
    "is_done": "storage.shards",
    "mark_done": "storage.shards",
    "marker_path": "storage.shards",
    "read_marker": "storage.shards",
    "shard_name": "storage.shards",
    "shard_path": "storage.shards",
    "write_shard": "storage.shards",
    "MANIFEST_SCHEMA": "storage.manifest",
    "manifest_part_path": "storage.manifest",
    "merge_manifest": "storage.manifest",
    "read_manifest": "storage.manifest",
    "write_manifest_part": "storage.manifest",
    "PILOT_FILE": "storage.pilot",
    "load_pilot": "storage.pilot",
    "pilot_cache_path": "storage.pilot",
    "save_pilot": "storage.pilot",
    "REACH_FILE": "storage.reach",
    "load_reach": "storage.reach",
    "save_reach": "storage.reach",
    "INPUTS_FILE": "storage.run_record",
    "check_or_claim_output": "storage.run_record",
    "check_or_record_inputs": "storage.run_record",
    "read_job_spec": "storage.run_record",
    "read_run_record": "storage.run_record",
    "write_job_spec": "storage.run_record",
    "write_run_record": "storage.run_record",
}

__all__ = [
    "INPUTS_FILE",
    "InputError",
    "MANIFEST_SCHEMA",
    "PILOT_FILE",
    "REACH_FILE",
    "References",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "bundle_dir",
    "check_or_claim_output",
    "check_or_record_inputs",
    "clean_partial",
    "encode_png",
    "encode_sample",
    "is_done",
    "load_bundle",
    "load_pilot",
    "load_reach",
    "manifest_part_path",
    "mark_done",
    "marker_path",
    "merge_manifest",
    "pilot_cache_path",
    "read_job_spec",
    "read_manifest",
    "read_marker",
    "read_references",
    "read_run_record",
    "save_bundle",
    "save_pilot",
    "save_reach",
    "shard_name",
    "shard_path",
    "write_job_spec",
    "write_manifest_part",
    "write_run_record",
    "write_shard",
]
assert set(__all__) == set(_EXPORTS)

if TYPE_CHECKING:
    from storage._atomic import atomic_open, atomic_write_bytes, atomic_write_json
    from storage.bundle import bundle_dir, load_bundle, save_bundle
    from storage.errors import InputError
    from storage.manifest import (
        MANIFEST_SCHEMA,
        manifest_part_path,
        merge_manifest,
        read_manifest,
        write_manifest_part,
    )
    from storage.pilot import PILOT_FILE, load_pilot, pilot_cache_path, save_pilot
    from storage.reach import REACH_FILE, load_reach, save_reach
    from storage.references import References, read_references
    from storage.run_record import (
        INPUTS_FILE,
        check_or_claim_output,
        check_or_record_inputs,
        read_job_spec,
        read_run_record,
        write_job_spec,
        write_run_record,
    )
    from storage.shards import (
        clean_partial,
        encode_png,
        encode_sample,
        is_done,
        mark_done,
        marker_path,
        read_marker,
        shard_name,
        shard_path,
        write_shard,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
