"""The Parquet manifest: one row per generated sample, kept or rejected.

Each shard writes `manifest/part-{shard:06d}.parquet`; `merge_manifest` concatenates the parts in shard
order into `manifest.parquet` (streamed: one part in memory at a time). The schema is fixed and explicit
so that parts from different processes always concatenate, and a training job can filter on it
(`kept == True`, `label == 3`, ...).

Runs with prompts (text-to-image models) put each sample's prompt in its row under `prompt`; their parts
and manifest have `PROMPT_SCHEMA` (`MANIFEST_SCHEMA` plus a nullable string `prompt` at the end). Runs
without prompts write `MANIFEST_SCHEMA`, byte-identical to versions that had no prompt column. All parts
of one run share one schema.

A shard's part is written before its done marker, so the marker vouches for it. A part lost later
(`manifest/` deleted) is not rebuilt: `forget_shards_without_part` removes those shards' markers and the
next run regenerates them, byte-identical.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_open, atomic_write_bytes
from storage.shards import SHARDS_DIR, done_shard_ids, marker_path

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "PROMPT_SCHEMA",
    "forget_shards_without_part",
    "manifest_rows",
    "manifest_part_path",
    "merge_manifest",
    "part_is_readable",
    "read_manifest",
    "write_manifest_part",
]

MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.parquet"
MANIFEST_VERSION = "1"

#: One row per sample. Nullable columns may be omitted from a row (they become null).
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("class_name", pa.string(), nullable=True),
        pa.field("condition", pa.string(), nullable=True),
        # unlabelled references given pseudo-classes (`pipeline.pseudo`): the class the sample was made as, for
        # audit; `label`/`class_name` hold it too only with --pseudo-labels; null for other runs
        pa.field("pseudo_class", pa.string(), nullable=True),
        pa.field("mmd_contribution", pa.float64(), nullable=False),
        # latent distance to the nearest reference; > 3 x the median reference distance = outside the support
        pa.field("nearest_reference_distance", pa.float64(), nullable=True),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("rank_in_shard", pa.int64(), nullable=False),
        # why a sample was not kept: outside_support | label (the judge saw another class) | rank; null = kept
        pa.field("rejected_reason", pa.string(), nullable=True),
        # labelled runs: the class the label judge assigns (the run's class id; -1 = none of the run's classes;
        # pseudo-class runs: an index into run.json's pseudo_classes.class_names)
        pa.field("judged_label", pa.int64(), nullable=True),
        # drawn from the shard's reserved indices to replace rejected samples
        pa.field("reserved", pa.bool_(), nullable=True),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
    ],
    metadata={"mmd_augment.manifest_version": MANIFEST_VERSION},
)
_PROMPT = "prompt"
#: The schema of runs with prompts; runs without keep `MANIFEST_SCHEMA` (and its bytes) unchanged.
PROMPT_SCHEMA = MANIFEST_SCHEMA.append(pa.field(_PROMPT, pa.string(), nullable=True))  # each sample's prompt
_COLUMNS = tuple(PROMPT_SCHEMA.names)  # every column a row may have
_REQUIRED = frozenset(f.name for f in MANIFEST_SCHEMA if not f.nullable)
_PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


def manifest_part_path(out_dir: str | os.PathLike[str], shard_id: int) -> Path:
    """`out_dir/manifest/part-{shard_id:06d}.parquet`."""
    if shard_id < 0:
        raise ValueError(f"shard id must be >= 0, got {shard_id}")
    return Path(out_dir) / MANIFEST_DIR / f"part-{shard_id:06d}.parquet"


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_manifest_part(out_dir: str | os.PathLike[str], shard_id: int, rows: Sequence[dict[str, Any]]) -> Path:
    """Write one shard's rows to `out_dir/manifest/part-{shard_id:06d}.parquet` atomically.

    The part has `PROMPT_SCHEMA` when any row has a `prompt` key (rows without it get a null prompt),
    else `MANIFEST_SCHEMA`.

    Raises:
        ValueError: a row has a column not in `PROMPT_SCHEMA`, lacks or nulls a required column, or
            a value does not convert to the column's type (a prompt must be a string or None).
    """
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - set(_COLUMNS))
        if unknown:
            raise ValueError(
                f"manifest row {i}: unknown column(s) {', '.join(unknown)} (schema: {', '.join(_COLUMNS)})"
            )
        missing = sorted(c for c in _REQUIRED if row.get(c) is None)
        if missing:
            raise ValueError(f"manifest row {i}: missing required column(s) {', '.join(missing)}")
    schema = PROMPT_SCHEMA if any(_PROMPT in row for row in rows) else MANIFEST_SCHEMA
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    try:
        table = pa.Table.from_pydict({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise ValueError(f"manifest part {shard_id}: a value does not fit the schema ({e})") from e
    return atomic_write_bytes(manifest_part_path(out_dir, shard_id), _table_bytes(table))


def _parts(out_dir: Path) -> list[tuple[int, Path]]:
    folder = out_dir / MANIFEST_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _PART_RE.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def merge_manifest(out_dir: str | os.PathLike[str], *, expected_shards: Iterable[int] | None = None) -> Path:
    """Concatenate `out_dir/manifest/part-*.parquet` in shard order into `out_dir/manifest.parquet`.

    Streams: one part is in memory at a time (each becomes a row group), so merging costs memory in
    proportion to a shard, not to the run.

    Args:
        out_dir: output folder.
        expected_shards: if given, every one of these shards must have a part (and no other part is
            merged), so a half-finished run cannot pass as complete. A `range` is never listed out in
            memory.

    The manifest has `PROMPT_SCHEMA` when the parts have a prompt column, else `MANIFEST_SCHEMA`. A part
    without rows fits either.

    Raises:
        FileNotFoundError: no parts, or an expected part is missing (nothing is written then).
        ValueError: a part has a different schema, or the parts mix runs with and without prompts
            (nothing is written then).
    """
    out_dir = Path(out_dir)
    shard_ids: Iterable[int]
    if expected_shards is None:
        shard_ids = [s for s, _ in _parts(out_dir)]
    else:
        shard_ids = expected_shards if isinstance(expected_shards, range) else sorted(set(expected_shards))
        _require_parts(out_dir, shard_ids)
    schema = _merged_schema(manifest_part_path(out_dir, s) for s in shard_ids)
    if schema is None:
        raise FileNotFoundError(f"{out_dir / MANIFEST_DIR}: no manifest parts to merge")
    merged = out_dir / MANIFEST_FILE
    with atomic_open(merged) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        for s in shard_ids:
            path = manifest_part_path(out_dir, s)
            writer.write_table(_current_schema(pq.read_table(path), path, schema))
    return merged


def _merged_schema(paths: Iterable[Path]) -> pa.Schema | None:
    """The schema of the merged manifest from the parts' footers: `PROMPT_SCHEMA` when the parts with rows
    have a prompt column (or, all parts being empty, any part has one), else `MANIFEST_SCHEMA`; None for no
    parts. ValueError naming a part when the parts with rows disagree."""
    first: tuple[Path, bool] | None = None  # the first part with rows, and whether it has prompts
    any_prompt = False
    count = 0
    for path in paths:
        count += 1
        meta = pq.read_metadata(path)
        has_prompt = _PROMPT in meta.schema.names
        any_prompt |= has_prompt
        if meta.num_rows == 0:
            continue
        if first is None:
            first = (path, has_prompt)
        elif has_prompt != first[1]:
            raise ValueError(
                f"{path}: manifest part {'has' if has_prompt else 'has no'} prompt column, unlike {first[0]} "
                "(the parts of one run have prompts, or none)"
            )
    if not count:
        return None
    prompted = first[1] if first is not None else any_prompt
    return PROMPT_SCHEMA if prompted else MANIFEST_SCHEMA


def _require_parts(out_dir: Path, shard_ids: Iterable[int]) -> None:
    """FileNotFoundError naming the first missing parts (and how many) among `shard_ids`."""
    missing: list[int] = []
    count = 0
    for s in shard_ids:
        if not manifest_part_path(out_dir, s).is_file():
            count += 1
            if len(missing) < 5:
                missing.append(s)
    if count:
        shown = ", ".join(str(s) for s in missing) + (", ..." if count > len(missing) else "")
        raise FileNotFoundError(f"{out_dir / MANIFEST_DIR}: manifest parts missing for {count} shard(s): {shown}")


def part_is_readable(out_dir: str | os.PathLike[str], shard_id: int) -> bool:
    """Whether the shard's manifest part exists and its Parquet footer reads."""
    try:
        pq.read_metadata(manifest_part_path(out_dir, shard_id))
    except (OSError, pa.ArrowException):
        return False
    return True


def forget_shards_without_part(out_dir: str | os.PathLike[str], prefix: str) -> list[int]:
    """Remove the done marker of every shard whose manifest part is missing or unreadable.

    A marker vouches for its shard's part (the part is written first); without the part the run could
    never finish, so such a shard is made pending again and the next run regenerates it (identically).

    Returns:
        The ids of the shards whose markers were removed.
    """
    forgotten = []
    for sid in done_shard_ids(out_dir, prefix, folder=SHARDS_DIR):
        if not part_is_readable(out_dir, sid):
            marker_path(out_dir, prefix, sid).unlink(missing_ok=True)
            forgotten.append(sid)
    return forgotten


def manifest_rows(path: str | os.PathLike[str], columns: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
    """The manifest's `columns`, one row group (a shard's part) at a time, as {column: values}: for
    statistics over a run of any size in memory bounded by a shard."""
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i, columns=list(columns)).to_pydict()


def _current_schema(table: pa.Table, path: Path, schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """A part in `schema` (this version's `MANIFEST_SCHEMA` or `PROMPT_SCHEMA`); a part of an earlier
    version that lacks only nullable columns (e.g. `nearest_reference_distance`) gets them as nulls, and an
    empty part drops a prompt column `schema` lacks. Anything else is an error."""
    if table.num_rows == 0 and _PROMPT in table.column_names and _PROMPT not in schema.names:
        table = table.drop_columns([_PROMPT])
    have = {f.name: f for f in table.schema}
    added = [f for f in schema if f.name not in have]
    unknown = sorted(set(have) - set(schema.names))
    retyped = sorted(f.name for f in schema if f.name in have and have[f.name].type != f.type)
    if unknown or retyped or any(not f.nullable for f in added):
        raise ValueError(f"{path}: manifest part has a different schema than this version writes")
    columns = [table[f.name].combine_chunks() if f.name in have else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def read_manifest(
    path: str | os.PathLike[str],
    filters: Any = None,
    *,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read a manifest (file or folder of parts) as a `pyarrow.Table`.

    `filters` is pyarrow's: e.g. `[("kept", "==", True)]` or `pyarrow.compute.field("label") == 3`.
    """
    return pq.read_table(path, filters=filters, columns=columns)
