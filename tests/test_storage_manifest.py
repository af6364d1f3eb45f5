"""Parquet manifest: fixed schema, validation, merge in shard order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage.manifest import MANIFEST_SCHEMA, manifest_part_path, merge_manifest, read_manifest, write_manifest_part


def rows(shard: int, n: int = 3, labelled: bool = True) -> list[dict]:
    out = []
    for r in range(n):
        index = shard * 100 + r
        row = {
            "key": f"run-{index:08d}",
            "index": index,
            "shard": shard,
            "seed": np.int64(7_000 + index),  # numpy scalars are fine
            "mmd_contribution": float(r) / 10,
            "kept": r != 1,
            "rank_in_shard": r,
            "config_hash": "cfg",
            "model_id": "model",
        }
        if labelled:
            row.update(label=r % 2, class_name=f"c{r % 2}", condition=f"class {r % 2}")
        out.append(row)
    return out


def test_part_has_the_fixed_schema(tmp_path):
    path = write_manifest_part(tmp_path, 2, rows(2, labelled=False))
    assert path == tmp_path / "manifest" / "part-000002.parquet" == manifest_part_path(tmp_path, 2)
    table = read_manifest(path)
    assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert table.column("label").null_count == 3 and table.column("condition").null_count == 3
    assert table.column("seed").to_pylist() == [7200, 7201, 7202]
    assert [f.name for f in table.schema] == [
        "key", "index", "shard", "seed", "label", "class_name", "condition", "pseudo_class",
        "mmd_contribution", "nearest_reference_distance", "kept", "rank_in_shard", "rejected_reason",
        "judged_label", "reserved", "config_hash", "model_id",
    ]  # fmt: skip
    empty = read_manifest(write_manifest_part(tmp_path, 5, []))
    assert empty.num_rows == 0 and empty.schema.equals(MANIFEST_SCHEMA, check_metadata=False)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"extra": 1}, "unknown column"),
        ({"kept": None}, "missing required column"),
        ({"index": "seven"}, "does not fit the schema"),
    ],
)
def test_bad_rows_are_rejected(tmp_path, change, match):
    bad = rows(0)
    bad[1].update(change)
    with pytest.raises(ValueError, match=match):
        write_manifest_part(tmp_path, 0, bad)
    assert not manifest_part_path(tmp_path, 0).exists()
    missing = rows(0)
    del missing[0]["model_id"]
    with pytest.raises(ValueError, match="model_id"):
        write_manifest_part(tmp_path, 0, missing)


def test_merge_in_shard_order_and_filter(tmp_path):
    for shard in (10, 2, 0):  # written out of order, as parallel workers would
        write_manifest_part(tmp_path, shard, rows(shard, labelled=shard != 2))
    path = merge_manifest(tmp_path)
    assert path == tmp_path / "manifest.parquet"
    table = read_manifest(path)
    assert table.num_rows == 9
    assert table.column("shard").to_pylist() == [0, 0, 0, 2, 2, 2, 10, 10, 10]
    assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    kept = read_manifest(path, filters=[("kept", "==", True)])
    assert kept.num_rows == 6
    assert read_manifest(path, filters=pc.field("label") == 1, columns=["key"]).column_names == ["key"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_merge_checks_completeness_and_schema(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest parts"):
        merge_manifest(tmp_path)
    write_manifest_part(tmp_path, 0, rows(0))
    write_manifest_part(tmp_path, 1, rows(1))
    with pytest.raises(FileNotFoundError, match="missing for 1 shard"):
        merge_manifest(tmp_path, expected_shards=range(3))
    assert read_manifest(merge_manifest(tmp_path, expected_shards=[1])).num_rows == 3
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["x"]}), manifest_part_path(tmp_path, 2))
    with pytest.raises(ValueError, match="part-000002.parquet"):
        merge_manifest(tmp_path)


def test_parts_of_an_earlier_version_without_a_nullable_column_are_upgraded(tmp_path):
    import pyarrow.parquet as pq

    write_manifest_part(tmp_path, 0, [dict(r, nearest_reference_distance=1.5) for r in rows(0)])
    old = pq.read_table(manifest_part_path(tmp_path, 0)).drop_columns(["nearest_reference_distance", "label"])
    pq.write_table(old, manifest_part_path(tmp_path, 1))  # as a version without these nullable columns wrote it
    merged = read_manifest(merge_manifest(tmp_path))
    assert merged.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert merged["nearest_reference_distance"].to_pylist() == [1.5] * 3 + [None] * 3
    assert merged["key"].to_pylist()[3:] == merged["key"].to_pylist()[:3]
    required = pq.read_table(manifest_part_path(tmp_path, 0)).drop_columns(["kept"])
    pq.write_table(required, manifest_part_path(tmp_path, 2))  # a required column missing: refused
    with pytest.raises(ValueError, match="part-000002.parquet: manifest part has a different schema"):
        merge_manifest(tmp_path)
