"""Captions from Hugging Face imagefolder's `metadata.jsonl` / `metadata.csv` in a reference folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.errors import InputError
from storage.references import read_references

SIZE = (16, 16)


def save(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(256).reshape(16, 16) + value).astype(np.uint8), mode="L").save(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def flat(folder: Path, n: int = 2) -> Path:
    for i in range(n):
        save(folder / f"img{i}.png", i)
    return folder


def classes(folder: Path) -> Path:
    save(folder / "cat" / "a.png", 1)
    save(folder / "dog" / "b.png", 2)
    return folder


def read(folder: Path):
    return read_references(str(folder), channels=1, size=SIZE)


def test_metadata_jsonl_file_name_and_text(tmp_path):
    flat(tmp_path)
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "img1.png", "text": "röntgen, PA view"}, {"file_name": "img0.png", "text": " a zero "}],
    )
    refs = read(tmp_path)
    assert refs.captions == ["a zero", "röntgen, PA view"]
    assert refs.files == ["img0.png", "img1.png"]  # metadata.jsonl is not an image
    assert "with captions" in refs.report[0]
    assert any("metadata.jsonl: captions from its text column" in line for line in refs.report)


def test_metadata_jsonl_in_class_sub_folders(tmp_path):
    classes(tmp_path)
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "dog/b.png", "text": "a dog"}, {"file_name": "cat/a.png", "text": "a cat"}],
    )
    refs = read(tmp_path)
    assert refs.class_names == ["cat", "dog"] and refs.labels.tolist() == [0, 1]
    assert refs.captions == ["a cat", "a dog"]


def test_metadata_csv(tmp_path):
    classes(tmp_path)
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\ncat/a.png,"a cat, sitting"\ndog/b.png,a dog\n', encoding="utf-8"
    )
    refs = read(tmp_path)
    assert refs.captions == ["a cat, sitting", "a dog"]


def test_metadata_extra_columns_are_ignored(tmp_path):
    classes(tmp_path)
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "cat/a.png", "label": 7, "text": "a cat", "source": {"site": "x"}},
            {"file_name": "dog/b.png", "label": None, "text": "a dog", "source": "y"},
        ],
    )
    refs = read(tmp_path)
    assert refs.captions == ["a cat", "a dog"]
    assert refs.labels.tolist() == [0, 1]  # the folders label, not the metadata's label column
    assert any("columns ignored: label, source" in line for line in refs.report)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("label,file_name,text,source\n3,cat/a.png,a cat,x\n4,dog/b.png,a dog,y\n")
    assert read(tmp_path).captions == ["a cat", "a dog"]


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv"])
def test_metadata_without_a_caption_column_gives_no_captions(tmp_path, name):
    classes(tmp_path)
    if name.endswith(".jsonl"):
        write_jsonl(tmp_path / name, [{"file_name": "cat/a.png", "label": 0}, {"file_name": "dog/b.png", "label": 1}])
    else:
        (tmp_path / name).write_text("file_name,label\ncat/a.png,0\ndog/b.png,1\n")
    refs = read(tmp_path)
    assert refs.captions is None
    assert refs.files == ["cat/a.png", "dog/b.png"]
    assert "with captions" not in refs.report[0]
    assert any(line.startswith(f"{name} read without captions") and "label" in line for line in refs.report)
    # the sidecars still caption the images; the metadata file only names them
    (tmp_path / "cat" / "a.txt").write_text("a cat")
    (tmp_path / "dog" / "b.txt").write_text("a dog")
    assert read(tmp_path).captions == ["a cat", "a dog"]


def test_metadata_is_never_an_image_nor_another_file(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "x"}\n')
    with pytest.raises(InputError, match="no images found") as info:
        read(tmp_path)
    assert "other file" not in str(info.value)


def test_a_row_naming_a_missing_file_is_one_error_naming_the_table_and_line(tmp_path):
    flat(tmp_path)
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "img0.png", "text": "zero"},
            {"file_name": "img1.png", "text": "one"},
            {"file_name": "gone/img9.png", "text": "nine"},
        ],
    )
    with pytest.raises(InputError) as info:
        read(tmp_path)
    message = str(info.value)
    assert "metadata.jsonl line 3" in message and "gone/img9.png" in message and "names no image" in message
    assert info.value.problems == [message]  # exactly one problem
    # also without a caption column: every row must name an image of the folder
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "img0.png"}, {"file_name": "img7.png"}])
    with pytest.raises(InputError, match=r"metadata\.jsonl line 2: 'img7\.png' names no image"):
        read(tmp_path)


def test_conflicting_captions_between_a_sidecar_and_metadata_are_an_error(tmp_path):
    flat(tmp_path)
    (tmp_path / "img0.txt").write_text("zero")
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "img0.png", "text": "zero"}, {"file_name": "img1.png", "text": "one"}],
    )
    assert read(tmp_path).captions == ["zero", "one"]  # agreeing sources are fine
    (tmp_path / "img0.txt").write_text("nought")
    with pytest.raises(InputError, match=r"metadata\.jsonl line 1: caption for img0\.png conflicts with .*img0\.txt"):
        read(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"file": "img0.png", "text": "x"}\n', r"metadata\.jsonl: line 1 has no file_name"),
        (
            '{"file_name": "img0.png", "text": "x"}\n{"file_name": "img1.png"}\n',
            r"metadata\.jsonl: line 2 has no text",
        ),
        ('{"file_name": "img0.png", "text": 3}\n', r"metadata\.jsonl: line 1: text must be a string"),
        ("{not json\n", r"metadata\.jsonl: line 1 is not valid JSON"),
    ],
)
def test_malformed_metadata_rows(tmp_path, content, match):
    flat(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(content)
    with pytest.raises(InputError, match=match):
        read(tmp_path)


def test_metadata_in_a_sub_folder_is_an_error_that_says_where_it_belongs(tmp_path):
    classes(tmp_path)
    (tmp_path / "cat" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n')
    with pytest.raises(InputError, match=r"cat/metadata\.jsonl: metadata\.jsonl is read only at the root"):
        read(tmp_path)


def test_captions_hash_the_same_from_sidecars_and_metadata(tmp_path):
    plain, sidecar, metadata, bare = (flat(tmp_path / name) for name in ("plain", "sidecar", "metadata", "bare"))
    for i, caption in enumerate(("zero", "one")):
        (sidecar / f"img{i}.txt").write_text(caption)
    write_jsonl(
        metadata / "metadata.jsonl",
        [{"file_name": "img0.png", "text": "zero", "label": 1}, {"file_name": "img1.png", "text": "one"}],
    )
    write_jsonl(bare / "metadata.jsonl", [{"file_name": "img0.png"}, {"file_name": "img1.png"}])
    hashes = {
        name: read(folder).content_hash
        for name, folder in zip(("p", "s", "m", "b"), (plain, sidecar, metadata, bare), strict=True)
    }
    assert hashes["s"] == hashes["m"] != hashes["p"]
    assert hashes["b"] == hashes["p"]  # a metadata file without captions changes nothing
