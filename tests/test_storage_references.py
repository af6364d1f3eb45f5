"""Reading and validating reference folders: formats, conversions, layouts, captions, errors, hash."""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from storage.errors import InputError
from storage.references import read_references, refuse_output_inside

SIZE = (16, 16)


def save(path: Path, image: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def gray(value: int | np.ndarray = 0, size: tuple[int, int] = (16, 16)) -> Image.Image:
    if isinstance(value, np.ndarray):
        return Image.fromarray(value.astype(np.uint8), mode="L")
    return Image.new("L", size, value)


def ramp(h: int = 16, w: int = 16) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def to_u8(t: torch.Tensor) -> np.ndarray:
    return ((t + 1) * 127.5).round().to(torch.int64).numpy()


def make_simple(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        save(folder / f"img{i}.png", gray(ramp() + i))
    return folder


# ------------------------------------------------------------------------------------------- happy paths


def test_grayscale_png_exact_values_and_sorted_order(tmp_path):
    save(tmp_path / "b.png", gray(ramp()))
    save(tmp_path / "a.png", gray(255))
    save(tmp_path / "c.png", gray(0))
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert refs.files == ["a.png", "b.png", "c.png"]
    assert refs.images.shape == (3, 1, 16, 16) and refs.images.dtype == torch.float32
    assert torch.all(refs.images[0] == 1.0) and torch.all(refs.images[2] == -1.0)
    np.testing.assert_array_equal(to_u8(refs.images[1, 0]), ramp())
    assert refs.labels is None and refs.class_names is None and refs.captions is None
    assert len(refs) == 3
    assert refs.report[0].startswith("3 images read from") and "unlabelled" in refs.report[0]
    assert len(refs.report) == 1  # nothing unusual


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((16, 16), 65535, dtype=np.uint16)
    arr[:8] = 32896  # 128 * 257
    save(tmp_path / "a.png", Image.fromarray(arr))
    save(tmp_path / "b.tif", Image.fromarray(np.full((16, 16), 257 * 10, dtype=np.uint16)))
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert to_u8(refs.images[0, 0])[0, 0] == 128 and to_u8(refs.images[0, 0])[15, 0] == 255
    assert np.all(to_u8(refs.images[1, 0]) == 10)
    assert "2 16-bit images scaled to 8-bit" in refs.report


def test_rgb_to_grayscale_uses_luma_and_reports(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (16, 16), (255, 0, 0)))
    save(tmp_path / "b.png", Image.new("RGB", (16, 16), (0, 0, 255)))
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert to_u8(refs.images[0, 0])[0, 0] == 76  # 0.299 * 255
    assert to_u8(refs.images[1, 0])[0, 0] == 29  # 0.114 * 255
    assert "2 images converted from RGB to grayscale" in refs.report


def test_alpha_composited_on_black_and_palette_to_rgb(tmp_path):
    save(tmp_path / "a.png", Image.new("RGBA", (16, 16), (200, 100, 50, 0)))
    save(tmp_path / "b.png", Image.new("RGBA", (16, 16), (255, 255, 255, 255)))
    save(tmp_path / "c.png", Image.new("LA", (16, 16), (255, 128)))
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    save(tmp_path / "d.png", pal)
    refs = read_references(str(tmp_path), channels=3, size=SIZE)
    assert refs.images.shape == (4, 3, 16, 16)
    assert torch.all(refs.images[0] == -1.0)  # fully transparent -> black
    assert torch.all(refs.images[1] == 1.0)
    assert np.all(to_u8(refs.images[2]) == 128)  # gray 255 at alpha 128/255, replicated to RGB
    assert to_u8(refs.images[3])[:, 0, 0].tolist() == [10, 20, 30]
    assert "3 images with transparency composited on black" in refs.report
    assert "1 image converted from palette to RGB" in refs.report
    assert "1 image converted from grayscale to RGB" in refs.report


def test_all_formats_are_read(tmp_path):
    img = Image.fromarray(np.stack([ramp()] * 3, axis=2))
    for ext in ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp"):
        save(tmp_path / f"x_{ext}.{ext.upper() if ext == 'png' else ext}", img)
    refs = read_references(str(tmp_path), channels=3, size=SIZE)
    assert len(refs) == 7 and "x_png.PNG" in refs.files
    lossless = [i for i, f in enumerate(refs.files) if f.rsplit(".", 1)[1].lower() in ("png", "tif", "tiff", "bmp")]
    for i in lossless:
        np.testing.assert_array_equal(to_u8(refs.images[i, 0]), ramp())


def test_mixed_sizes_are_resized_cropped_and_reported(tmp_path):
    save(tmp_path / "a.png", gray(ramp(16, 16)))
    save(tmp_path / "b.png", gray(ramp(32, 32)))
    save(tmp_path / "c.png", gray(ramp(32, 48)))  # 48 wide, 32 high: cropped to square
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert refs.images.shape == (3, 1, 16, 16)
    assert refs.images.min() >= -1 and refs.images.max() <= 1
    resized = (
        "references are 3 sizes (16×16, 32×32, 48×32), grayscale; the model draws 16×16 grayscale: "
        "resizing 2 images (from 32×32, 48×32)"
    )
    assert resized in refs.report
    cropped = [line for line in refs.report if line.startswith("1 image center-cropped")]
    assert refs.warnings == [resized, *cropped] and len(cropped) == 1  # both change what the model sees


def test_resizing_is_a_warning_naming_both_sizes_and_the_channels(tmp_path):
    for i in range(3):
        save(tmp_path / f"x{i}.png", gray(ramp(128, 128) // (i + 1)))
    refs = read_references(str(tmp_path), channels=1, size=(32, 32))
    line = "references are 128×128 grayscale; the model draws 32×32 grayscale: resizing 3 images"
    assert refs.warnings == [line] and line in refs.report and refs.source == "128×128 grayscale"
    rgb = read_references(str(tmp_path), channels=3, size=(16, 16))
    assert rgb.warnings == ["references are 128×128 grayscale; the model draws 16×16 RGB: resizing 3 images"]
    same = read_references(str(tmp_path), channels=1, size=(128, 128))
    assert same.warnings == [] and same.source == "128×128 grayscale"  # nothing resized: nothing to warn about


def test_non_square_model_size(tmp_path):
    make_simple(tmp_path, 2)
    refs = read_references(str(tmp_path), channels=1, size=(8, 16))
    assert refs.images.shape == (2, 1, 8, 16)
    assert any("aspect ratio 2:1" in line for line in refs.report)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save(tmp_path / "a.jpg", Image.new("L", (32, 16), 200), exif=exif.tobytes())
    save(tmp_path / "b.png", gray(0))
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert "1 image rotated as their EXIF orientation says" in refs.report
    assert (
        "references are 2 sizes (16×16, 16×32), grayscale; the model draws 16×16 grayscale: resizing 1 image "
        "(from 16×32)"
    ) in refs.report


def test_class_folders_give_sorted_labels(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 1), ("cat", 3)):
        for i in range(n):
            save(tmp_path / cls / f"{i}.png", gray(i * 10))
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert refs.class_names == ["ant", "cat", "zebra"]
    assert refs.files[0] == "ant/0.png" and refs.files[-1] == "zebra/1.png"
    assert refs.labels.dtype == torch.int64 and refs.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert "3 classes: ant (1), cat (3), zebra (2)" in refs.report[0]


def test_nested_class_folders_and_empty_subfolders_are_reported(tmp_path):
    save(tmp_path / "a" / "x.png", gray(0))
    save(tmp_path / "b" / "deeper" / "y.png", gray(0))
    refs = read_references(str(tmp_path / ""), channels=1, size=SIZE)
    assert refs.class_names == ["a", "b"] and refs.labels.tolist() == [0, 1]
    nested = (
        "1 image in sub-sub-folders (e.g. b/deeper/y.png) labelled with the class of their top-level folder (b): "
        "the classes are the top-level folders only"
    )
    assert nested in refs.report and refs.warnings == [nested]

    flat = tmp_path / "flat"
    make_simple(flat, 2)
    (flat / "unused").mkdir()
    refs = read_references(str(flat), channels=1, size=SIZE)
    assert refs.labels is None and "1 sub-folder without images ignored: unused" in refs.report


def test_hidden_and_system_files_are_ignored(tmp_path):
    make_simple(tmp_path, 2)
    (tmp_path / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "._img0.png").write_bytes(b"appledouble")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("x")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert refs.files == ["img0.png", "img1.png"]
    assert any(line.startswith("4 hidden or system files ignored") for line in refs.report)


def test_duplicates_reported(tmp_path):
    make_simple(tmp_path, 2)
    shutil.copy(tmp_path / "img0.png", tmp_path / "img9.png")
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert any("byte-identical" in line and "img0.png = img9.png" in line for line in refs.report)


# ---------------------------------------------------------------------------------------------- captions


def test_sidecar_captions(tmp_path):
    make_simple(tmp_path, 2)
    (tmp_path / "img0.txt").write_text("a zero\n")
    (tmp_path / "img1.txt").write_text("a one")
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert refs.captions == ["a zero", "a one"]
    assert "with captions" in refs.report[0]


def test_captions_jsonl_and_csv(tmp_path):
    for cls in ("a", "b"):
        save(tmp_path / cls / f"{cls}1.png", gray(3))
    lines = [{"file_name": "a/a1.png", "text": "first"}, {"file_name": "b1.png", "text": "second"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert refs.captions == ["first", "second"] and refs.labels.tolist() == [0, 1]

    (tmp_path / "captions.jsonl").unlink()
    (tmp_path / "captions.csv").write_text('file,caption\na/a1.png,"one, with comma"\nb/b1.png,two\n')
    refs = read_references(str(tmp_path), channels=1, size=SIZE)
    assert refs.captions == ["one, with comma", "two"]


@pytest.mark.parametrize(
    "setup, culprit",
    [
        (lambda d: (d / "img0.txt").write_text("only one"), "img1.png"),
        (lambda d: (d / "orphan.txt").write_text("x"), "orphan.txt"),
        (
            lambda d: (d / "captions.jsonl").write_text('{"file_name": "nope.png", "text": "x"}\n'),
            "captions.jsonl",
        ),
        (lambda d: (d / "captions.jsonl").write_text("{not json\n"), "captions.jsonl"),
        (lambda d: (d / "captions.csv").write_text("name,words\nimg0.png,x\n"), "captions.csv"),
        (lambda d: (d / "img0.txt").write_bytes(b"\xff\xfe\xfa"), "img0.txt"),
    ],
)
def test_caption_errors(tmp_path, setup, culprit):
    make_simple(tmp_path, 2)
    setup(tmp_path)
    with pytest.raises(InputError, match=culprit.replace(".", r"\.")):
        read_references(str(tmp_path), channels=1, size=SIZE)


# ------------------------------------------------------------------------------------------------ errors


def noise(h: int, w: int) -> Image.Image:
    return gray(np.random.default_rng(0).integers(0, 256, (h, w)))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, make, needle",
    [
        ("bad.png", lambda p: p.write_bytes(b"this is not a png"), "not a readable image"),
        ("cut.png", lambda p: p.write_bytes(png_bytes(noise(24, 24))[:300]), "truncated"),
        ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
        ("notes.docx", lambda p: p.write_bytes(b"PK\3\4"), "not an image"),
        ("scan.dcm", lambda p: p.write_bytes(b"DICM"), "unsupported image format DICOM"),
        ("tiny.png", lambda p: save(p, gray(0, (5, 5))), "too small for the model: 5x5 < 8x8"),
        ("big.png", lambda p: save(p, gray(0, (40, 30))), "decompression bomb"),
        ("float.tif", lambda p: save(p, Image.new("F", (16, 16), 0.5)), "unsupported pixel type"),
    ],
)
def test_bad_file_raises_input_error_naming_it(tmp_path, name, make, needle):
    make_simple(tmp_path, 2)
    make(tmp_path / name)
    with pytest.raises(InputError) as info:
        read_references(str(tmp_path), channels=1, size=SIZE, max_pixels=1000)
    message = str(info.value)
    assert name in message and needle in message, message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_folder_level_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist") as info:
        read_references(str(tmp_path / "missing"), channels=1, size=SIZE)
    assert "missing" in str(info.value)

    (tmp_path / "file.png").write_bytes(png_bytes(gray(0)))
    with pytest.raises(InputError, match="not a folder"):
        read_references(str(tmp_path / "file.png"), channels=1, size=SIZE)

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no images found"):
        read_references(str(tmp_path / "empty"), channels=1, size=SIZE)

    (tmp_path / "one").mkdir()
    save(tmp_path / "one" / "a.png", gray(0))
    with pytest.raises(InputError, match="one: only 1 image; need at least 2"):
        read_references(str(tmp_path / "one"), channels=1, size=SIZE)
    assert len(read_references(str(tmp_path / "one"), channels=1, size=SIZE, min_count=1)) == 1


def test_layout_errors(tmp_path):
    mixed = tmp_path / "mixed"
    save(mixed / "a.png", gray(0))
    save(mixed / "cls" / "b.png", gray(0))
    with pytest.raises(InputError, match="mixes images"):
        read_references(str(mixed), channels=1, size=SIZE)

    classes = tmp_path / "classes"
    save(classes / "cat" / "a.png", gray(0))
    save(classes / "cat" / "b.png", gray(0))
    (classes / "dog").mkdir()
    with pytest.raises(InputError, match=r"dog/: class folder has no images"):
        read_references(str(classes), channels=1, size=SIZE)


def test_all_problems_are_collected(tmp_path):
    make_simple(tmp_path, 2)
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "y.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"x\.png: empty file \(0 bytes\) \(and 1 more problem\)") as info:
        read_references(str(tmp_path), channels=1, size=SIZE)
    assert len(info.value.problems) == 2 and "y.png" in info.value.problems[1]


def test_pillow_decompression_bomb_error_is_an_input_error(tmp_path, monkeypatch):
    make_simple(tmp_path, 2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x16 = 256 > 2 * 100: Pillow raises
    with pytest.raises(InputError, match="decompression bomb"):
        read_references(str(tmp_path), channels=1, size=SIZE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 > 200: Pillow warns
    with pytest.raises(InputError, match="decompression bomb"):
        read_references(str(tmp_path), channels=1, size=SIZE)


# ------------------------------------------------------------------------------------------ content hash


def test_content_hash_ignores_location_and_mtime_but_not_content(tmp_path):
    src = make_simple(tmp_path / "src", 3)
    (src / "img0.txt").write_text("zero")
    (src / "img1.txt").write_text("one")
    (src / "img2.txt").write_text("two")
    base = read_references(str(src), channels=1, size=SIZE).content_hash
    assert len(base) == 64

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, copy)
    for p in copy.iterdir():
        os.utime(p, (1_000_000, 1_000_000))
    assert read_references(str(copy), channels=1, size=SIZE).content_hash == base
    assert read_references(str(copy), channels=3, size=(8, 8)).content_hash == base  # inputs only

    data = bytearray((copy / "img1.png").read_bytes())
    save(copy / "img1.png", gray(np.where(ramp() == 7, 8, ramp())))  # one pixel differs
    assert read_references(str(copy), channels=1, size=SIZE).content_hash != base
    (copy / "img1.png").write_bytes(bytes(data))
    assert read_references(str(copy), channels=1, size=SIZE).content_hash == base

    (copy / "img2.txt").write_text("TWO")
    assert read_references(str(copy), channels=1, size=SIZE).content_hash != base
    (copy / "img2.txt").write_text("two")
    (copy / "img2.png").rename(copy / "img3.png")
    (copy / "img2.txt").rename(copy / "img3.txt")
    assert read_references(str(copy), channels=1, size=SIZE).content_hash != base


def test_content_hash_covers_labels(tmp_path):
    for cls in ("a", "b"):
        save(tmp_path / "one" / cls / "x.png", gray(1))
    save(tmp_path / "two" / "a" / "x.png", gray(1))
    save(tmp_path / "two" / "c" / "x.png", gray(1))
    h1 = read_references(str(tmp_path / "one"), channels=1, size=SIZE).content_hash
    h2 = read_references(str(tmp_path / "two"), channels=1, size=SIZE).content_hash
    assert h1 != h2


# ------------------------------------------------------------------------------------------------ fsspec


def test_memory_filesystem_matches_local(tmp_path):
    local = make_simple(tmp_path / "refs", 3)
    (local / "img0.txt").write_text("hello")
    (local / "img1.txt").write_text("there")
    (local / "img2.txt").write_text("world")
    fs = fsspec.filesystem("memory")
    root = f"/refs-{uuid.uuid4().hex}"
    try:
        for p in local.iterdir():
            fs.pipe(f"{root}/{p.name}", p.read_bytes())
        mem = read_references(f"memory://{root}", channels=1, size=SIZE)
        loc = read_references(str(local), channels=1, size=SIZE)
        assert mem.files == loc.files and mem.captions == loc.captions
        assert mem.content_hash == loc.content_hash
        assert torch.equal(mem.images, loc.images)
        fs.pipe(f"{root}/bad.png", b"nope")
        with pytest.raises(InputError) as info:
            read_references(f"memory://{root}", channels=1, size=SIZE)
        assert f"memory://{root}/bad.png: not a readable image" in " | ".join(info.value.problems)
    finally:
        fs.rm(root, recursive=True)

    assert len(read_references(f"file://{local}", channels=1, size=SIZE)) == 3
    with pytest.raises(InputError, match="does not exist"):
        read_references(f"memory:///nothing-{uuid.uuid4().hex}", channels=1, size=SIZE)


# ------------------------------------------------------------------ permissions, links, output inside (issue 16)


def test_unreadable_folders_and_files_are_reported_as_permission_denied(unprivileged):
    top, drop = unprivileged
    refs = top / "refs"
    for cls in ("a", "b"):
        make_simple(refs / cls)
    read_references(str(refs), channels=1, size=SIZE)  # as the owner: fine (and every decoder is imported)
    (refs / "b").chmod(0o000)
    with drop(), pytest.raises(InputError, match=r"refs/b/: permission denied: cannot list this folder$"):
        read_references(str(refs), channels=1, size=SIZE)
    (refs / "b").chmod(0o755)
    (refs / "a" / "img0.png").chmod(0o000)
    with drop(), pytest.raises(InputError, match=r"refs/a/img0.png: permission denied: cannot read this file$"):
        read_references(str(refs), channels=1, size=SIZE)
    refs.chmod(0o000)
    with drop(), pytest.raises(InputError, match=r"refs: permission denied: cannot list this folder$"):
        read_references(str(refs), channels=1, size=SIZE)


@pytest.mark.parametrize(
    "link, target, expect",
    [
        ("a/loop.png", "loop.png", r"a/loop.png: symbolic link loop \(the link leads back to itself\)"),
        ("a/up", "..", r"a/up: symbolic link loop: leads back to .*refs \(remove the link\)"),
        ("a/gone.png", "nowhere.png", r"a/gone.png: broken symbolic link \(its target nowhere.png does not exist\)"),
        ("c", "a", r"refs/(a|c): links to a folder already read as .*refs/(a|c) \(remove one link\)"),
    ],
)
def test_bad_symbolic_links_are_named(tmp_path, link, target, expect):
    refs = tmp_path / "refs"
    for cls in ("a", "b"):
        make_simple(refs / cls)
    (refs / link).symlink_to(target)
    with pytest.raises(InputError, match=expect):
        read_references(str(refs), channels=1, size=SIZE)


def test_class_folders_that_are_symbolic_links_are_followed(tmp_path):
    refs = tmp_path / "refs"
    make_simple(refs / "a")
    make_simple(tmp_path / "elsewhere" / "b")
    (refs / "b").symlink_to(tmp_path / "elsewhere" / "b")
    (refs / ".hidden-link").symlink_to(refs)  # hidden: ignored, never followed
    got = read_references(str(refs), channels=1, size=SIZE)
    assert got.class_names == ["a", "b"] and got.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert got.files == ["a/img0.png", "a/img1.png", "a/img2.png", "b/img0.png", "b/img1.png", "b/img2.png"]
    copy = tmp_path / "copy"
    shutil.copytree(refs, copy, symlinks=False, ignore=shutil.ignore_patterns(".*"))
    assert read_references(str(copy), channels=1, size=SIZE).content_hash == got.content_hash


def test_an_output_folder_inside_the_references_is_refused(tmp_path):
    refs = make_simple(tmp_path / "refs")
    for out in (refs / "out", refs, refs / "a" / ".." / "b"):
        with pytest.raises(InputError, match=r"inside the reference folder .* choose an --out outside it"):
            refuse_output_inside(str(refs), str(out))
    refuse_output_inside(str(refs), str(tmp_path / "out"))
    refuse_output_inside(str(refs), str(tmp_path / "refs-out"))  # a sibling whose name starts alike
    refuse_output_inside("memory://refs", str(refs / "out"))  # not a local folder: nothing to compare
