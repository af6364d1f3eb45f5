"""The `txt` member of image-text shards: the prompt as UTF-8, read back by webdataset as a string."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from storage.shards import encode_png, encode_sample, write_shard

PROMPTS = ["röntgen, PA view", "a chest X-ray, 日本語 ✓ 🩻", "plain ascii"]


def pixels(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def samples():
    for i, prompt in enumerate(PROMPTS):
        yield {
            "__key__": f"run-{i:08d}",
            "png": encode_png(pixels(i)),
            "json": {"seed": i, "prompt": prompt, "kept": True},
            "txt": prompt,
        }


def test_png_json_txt_shard_reads_back_as_image_prompt_pairs(tmp_path):
    path = write_shard(tmp_path, "data", 0, samples())
    pairs = list(wds.WebDataset(str(path), shardshuffle=False).decode("pil").to_tuple("png", "txt"))
    assert [prompt for _, prompt in pairs] == PROMPTS
    for i, (image, _) in enumerate(pairs):
        assert isinstance(image, Image.Image)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels(i))
    decoded = list(wds.WebDataset(str(path), shardshuffle=False).decode("pil"))
    assert [s["json"]["prompt"] for s in decoded] == PROMPTS  # json members still work beside txt
    with tarfile.open(path) as tf:
        assert tf.extractfile("run-00000000.txt").read() == "röntgen, PA view".encode()  # UTF-8, no BOM
        assert sorted(m.name for m in tf.getmembers())[:3] == [
            "run-00000000.json",
            "run-00000000.png",
            "run-00000000.txt",
        ]


def test_txt_member_encoding():
    enc = encode_sample({"__key__": "k", "txt": "röntgen", "json": {"a": "ö"}})
    assert enc["txt"] == "röntgen".encode()
    assert json.loads(enc["json"]) == {"a": "ö"}  # json members unchanged (ASCII-escaped JSON)
    assert encode_sample({"__key__": "k", "txt": b"raw"})["txt"] == b"raw"
    with pytest.raises(ValueError, match="cannot encode member 'txt'.*must be a str"):
        encode_sample({"__key__": "k", "txt": 3})
    with pytest.raises(ValueError, match="cannot encode member 'txt'"):
        encode_sample({"__key__": "k", "txt": "\ud800"})  # a lone surrogate is no UTF-8


def test_shards_with_text_are_byte_reproducible(tmp_path):
    a = write_shard(tmp_path / "a", "data", 0, samples()).read_bytes()
    b = write_shard(tmp_path / "b", "data", 0, samples()).read_bytes()
    assert a == b
