"""WebDataset shards: round trip through webdataset, byte determinism, atomicity, done markers."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from storage.shards import (
    clean_partial,
    is_done,
    mark_done,
    marker_path,
    read_marker,
    shard_name,
    shard_path,
    write_shard,
)


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def samples(n: int = 3, *, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("worker died")
        yield {
            "__key__": f"run0-{i:08d}",
            "png": png(i),
            "json": {
                "seed": 1000 + i,
                "index": i,
                "mmd_contribution": 0.25 * i,
                "kept": True,
                "b": {"z": 1, "a": 2},
            },
            "cls": i % 2,
            "latent.npy": np.full((4, 2, 2), i, dtype=np.float32),
        }


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_shard_name():
    assert shard_name("train", 7) == "train-000007.tar"
    with pytest.raises(ValueError):
        shard_name("a/b", 1)
    with pytest.raises(ValueError):
        shard_name("a", -1)


def test_round_trip_through_webdataset(tmp_path):
    path = write_shard(tmp_path, "data", 3, samples())
    assert path == tmp_path / "shards" / "data-000003.tar"
    got = list(wds.WebDataset(str(path), shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in got] == [f"run0-{i:08d}" for i in range(3)]
    for i, s in enumerate(got):
        expected = np.asarray(Image.open(io.BytesIO(png(i))))
        np.testing.assert_array_equal(s["png"], expected)
        assert s["json"]["seed"] == 1000 + i and s["json"]["b"] == {"a": 2, "z": 1}
        assert s["cls"] == i % 2 and isinstance(s["cls"], int)
        np.testing.assert_array_equal(s["latent.npy"], np.full((4, 2, 2), i, dtype=np.float32))
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    assert members[0].name == "run0-00000000.cls"
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "bigdata", "bigdata", 0o444)
    }
    raw = tarfile.open(path).extractfile("run0-00000001.json").read()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()


def _write_in_child(out_dir: str) -> None:
    write_shard(out_dir, "data", 0, samples())


def test_bytes_identical_across_runs_and_processes(tmp_path):
    first = sha(write_shard(tmp_path / "a", "data", 0, samples()))
    assert sha(write_shard(tmp_path / "b", "data", 0, samples())) == first
    # Another process: a fresh interpreter (forking a process that already runs torch/OpenMP threads
    # can hang or crash the child in a long test session).
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_write_in_child, args=(str(tmp_path / "c"),))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert sha(shard_path(tmp_path / "c", "data", 0)) == first


def test_crash_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="worker died"):
        write_shard(tmp_path, "data", 0, samples(3, fail_at=2))
    assert list((tmp_path / "shards").iterdir()) == []
    assert not is_done(tmp_path, "data", 0)
    # An earlier complete shard is not replaced by a failed rewrite.
    good = write_shard(tmp_path, "data", 0, samples())
    digest = sha(good)
    with pytest.raises(RuntimeError):
        write_shard(tmp_path, "data", 0, samples(3, fail_at=1))
    assert sha(good) == digest and is_done(tmp_path, "data", 0)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "data-000000.tar",
        "data-000000.tar.done",
    ]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"__key__": "a.b", "png": b"x"}, "dots or slashes"),
        ({"__key__": "a/b", "png": b"x"}, "dots or slashes"),
        ({"__key__": "", "png": b"x"}, "__key__"),
        ({"png": b"x"}, "__key__"),
        ({"__key__": "a"}, "no members"),
        ({"__key__": "a", "_meta": "x"}, "starts with '_'"),
        ({"__key__": "a", "x.pth": b"x"}, "pickled"),
        ({"__key__": "a", "cls": "three"}, "cls must be an int"),
        ({"__key__": "a", "weird": object()}, "cannot encode"),
    ],
)
def test_invalid_samples_are_rejected(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        write_shard(tmp_path, "data", 0, [bad])
    assert not shard_path(tmp_path, "data", 0).exists()


def test_duplicate_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shard(tmp_path, "data", 0, [{"__key__": "a", "cls": 1}, {"__key__": "a", "cls": 2}])
    assert list((tmp_path / "shards").iterdir()) == []


def test_done_markers(tmp_path):
    path = write_shard(tmp_path, "data", 1, samples(), marker_info={"manifest_rows": 3})
    marker = read_marker(tmp_path, "data", 1)
    assert marker["count"] == 3 and marker["sha256"] == sha(path) and marker["size"] == path.stat().st_size
    assert marker["manifest_rows"] == 3 and marker["shard"] == "data-000001.tar"
    assert is_done(tmp_path, "data", 1)
    assert not is_done(tmp_path, "data", 2)

    data = bytearray(path.read_bytes())
    data[600] ^= 1  # same size, one bit flipped
    path.write_bytes(bytes(data))
    assert is_done(tmp_path, "data", 1, verify_hash=False) and not is_done(tmp_path, "data", 1)
    path.write_bytes(bytes(data[:-512]))
    assert not is_done(tmp_path, "data", 1, verify_hash=False)
    path.unlink()
    assert not is_done(tmp_path, "data", 1)

    write_shard(tmp_path, "data", 4, samples(2), write_marker=False)
    assert not marker_path(tmp_path, "data", 4).exists() and not is_done(tmp_path, "data", 4)
    mark_done(tmp_path, "data", 4, {"count": 2})
    assert is_done(tmp_path, "data", 4) and read_marker(tmp_path, "data", 4)["count"] == 2
    with pytest.raises(FileNotFoundError, match="data-000009.tar"):
        mark_done(tmp_path, "data", 9, {"count": 0})
    marker_path(tmp_path, "data", 4).write_text("{garbage")
    assert not is_done(tmp_path, "data", 4)


def test_clean_partial(tmp_path):
    write_shard(tmp_path, "data", 0, samples(1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    shards = tmp_path / "shards"
    leftovers = [shards / f"data-000001.tar.tmp-{dead_pid}-abcd1234", tmp_path / f"run.json.tmp-{dead_pid}-x"]
    for p in leftovers:
        p.write_bytes(b"partial")
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / f"part-000001.parquet.tmp-{dead_pid}-y").write_bytes(b"p")
    # a crashed run's file whose pid is alive again (a restarted container gets the same pid): not the run's
    same_pid = shards / f"data-000003.tar.tmp-{os.getpid()}-abcd0000"
    same_pid.write_bytes(b"truncated")
    live = shards / "data-000002.tar.tmp-0123456789abcdef-live0000"  # a writer of the current run (its token)
    live.write_bytes(b"in progress")
    removed = clean_partial(tmp_path, keep_token="0123456789abcdef")
    assert len(removed) == 4 and all(not p.exists() for p in removed) and same_pid in removed
    assert live.exists() and shard_path(tmp_path, "data", 0).exists() and is_done(tmp_path, "data", 0)
    assert clean_partial(tmp_path / "nothing-here") == []


@pytest.mark.parametrize("shape, mode", [((5, 7), "L"), ((5, 7, 1), "L"), ((5, 7, 3), "RGB")])
def test_encode_png_is_lossless_and_deterministic(shape, mode):
    from storage.shards import encode_png

    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels)
    assert data == encode_png(pixels.copy())
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == mode
    np.testing.assert_array_equal(np.asarray(image), pixels.reshape(shape[:2]) if mode == "L" else pixels)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((2, 2, 4), dtype=np.uint8))
