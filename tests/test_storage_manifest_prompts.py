"""The manifest's `prompt` column: only in runs with prompts; runs without keep today's bytes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.manifest import (
    MANIFEST_SCHEMA,
    PROMPT_SCHEMA,
    manifest_part_path,
    merge_manifest,
    read_manifest,
    write_manifest_part,
)

PROMPTS = ["röntgen, PA view", "a chest X-ray, 日本語 ✓", ""]


def rows(shard: int, n: int = 3, prompts: list[str | None] | None = None) -> list[dict]:
    out = []
    for r in range(n):
        index = shard * 100 + r
        row = {
            "key": f"run-{index:08d}",
            "index": index,
            "shard": shard,
            "seed": 7_000 + index,
            "label": r % 2,
            "mmd_contribution": r / 10,
            "kept": r != 1,
            "rank_in_shard": r,
            "config_hash": "cfg",
            "model_id": "model",
        }
        if prompts is not None:
            row["prompt"] = prompts[r]
        out.append(row)
    return out


def old_part_bytes(part_rows: list[dict]) -> bytes:
    """What the manifest code wrote before the prompt column: MANIFEST_SCHEMA, zstd."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(part_rows, schema=MANIFEST_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def test_prompt_schema_is_the_manifest_schema_plus_a_nullable_prompt():
    assert PROMPT_SCHEMA.names == [*MANIFEST_SCHEMA.names, "prompt"]
    assert PROMPT_SCHEMA.field("prompt").type == pa.string() and PROMPT_SCHEMA.field("prompt").nullable
    assert PROMPT_SCHEMA.metadata == MANIFEST_SCHEMA.metadata
    assert "prompt" not in MANIFEST_SCHEMA.names


def test_a_part_without_prompts_is_byte_identical_to_before(tmp_path):
    plain = rows(0)
    path = write_manifest_part(tmp_path, 0, plain)
    schema = pq.read_schema(path)
    assert "prompt" not in schema.names and schema.equals(MANIFEST_SCHEMA, check_metadata=True)
    assert path.read_bytes() == old_part_bytes(plain)
    assert write_manifest_part(tmp_path, 1, []).read_bytes() == old_part_bytes([])

    write_manifest_part(tmp_path, 1, rows(1))
    merged = merge_manifest(tmp_path).read_bytes()
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, MANIFEST_SCHEMA, compression="zstd") as writer:
        for shard in (0, 1):
            writer.write_table(pa.Table.from_pylist(rows(shard), schema=MANIFEST_SCHEMA))
    assert merged == sink.getvalue().to_pybytes()


def test_a_part_with_prompts_round_trips_them(tmp_path):
    path = write_manifest_part(tmp_path, 0, rows(0, prompts=PROMPTS))
    table = read_manifest(path)
    assert table.schema.equals(PROMPT_SCHEMA, check_metadata=True)
    assert table["prompt"].to_pylist() == PROMPTS
    assert table["label"].to_pylist() == [0, 1, 0]

    some = rows(1, prompts=["one", None, "three"])
    del some[2]["prompt"]  # any row with the key makes the part prompted; the others get null
    assert read_manifest(write_manifest_part(tmp_path, 1, some))["prompt"].to_pylist() == ["one", None, None]


def test_a_prompt_must_be_a_string(tmp_path):
    with pytest.raises(ValueError, match="does not fit the schema"):
        write_manifest_part(tmp_path, 0, rows(0, prompts=["ok", 3, "ok"]))
    assert not manifest_part_path(tmp_path, 0).exists()


def test_merge_of_prompt_parts_keeps_the_column(tmp_path):
    for shard in (2, 0):
        write_manifest_part(tmp_path, shard, rows(shard, prompts=[f"{p} #{shard}" for p in PROMPTS]))
    write_manifest_part(tmp_path, 1, [])  # an empty part fits a run with prompts too
    table = read_manifest(merge_manifest(tmp_path, expected_shards=range(3)))
    assert table.schema.equals(PROMPT_SCHEMA, check_metadata=True)
    assert table["prompt"].to_pylist() == [f"{p} #0" for p in PROMPTS] + [f"{p} #2" for p in PROMPTS]
    assert table["shard"].to_pylist() == [0, 0, 0, 2, 2, 2]
    assert read_manifest(tmp_path / "manifest.parquet", filters=[("prompt", "==", PROMPTS[0] + " #2")]).num_rows == 1


def test_a_run_mixing_parts_with_and_without_prompts_is_an_error(tmp_path):
    write_manifest_part(tmp_path, 0, rows(0, prompts=PROMPTS))
    write_manifest_part(tmp_path, 1, rows(1))
    with pytest.raises(
        ValueError, match=r"part-000001\.parquet: manifest part has no prompt column, unlike .*part-000000"
    ):
        merge_manifest(tmp_path)
    assert not (tmp_path / "manifest.parquet").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []

    write_manifest_part(tmp_path, 0, rows(0))
    write_manifest_part(tmp_path, 1, rows(1, prompts=PROMPTS))
    with pytest.raises(ValueError, match=r"part-000001\.parquet: manifest part has prompt column"):
        merge_manifest(tmp_path, expected_shards=[0, 1])


def test_older_parts_lacking_a_nullable_column_are_still_upgraded_in_a_prompted_merge(tmp_path):
    write_manifest_part(tmp_path, 0, [dict(r, nearest_reference_distance=1.5) for r in rows(0, prompts=PROMPTS)])
    older = pq.read_table(manifest_part_path(tmp_path, 0)).drop_columns(["nearest_reference_distance"])
    pq.write_table(older, manifest_part_path(tmp_path, 1))
    merged = read_manifest(merge_manifest(tmp_path))
    assert merged.schema.equals(PROMPT_SCHEMA, check_metadata=False)
    assert merged["nearest_reference_distance"].to_pylist() == [1.5] * 3 + [None] * 3
    assert merged["prompt"].to_pylist() == PROMPTS * 2
