"""Read and validate a folder of reference images (local path or fsspec URL).

Layout (as torchvision's ImageFolder):

    refs/a.png, refs/b.png, ...               unlabelled
    refs/cat/a.png, refs/dog/b.png, ...       labelled; class names sorted -> label ids 0..K-1

Optional captions, from any mix of:

- a sidecar `<stem>.txt` next to an image;
- `captions.jsonl` / `captions.csv` at the root: every row maps a file name (`file_name`, `file`, `image`
  or `path`: a path relative to the root, or a bare name when unique) to a caption (`caption`, `text` or
  `prompt`);
- Hugging Face `imagefolder`'s `metadata.jsonl` / `metadata.csv` at the root: every row names an image in a
  `file_name` column (resolved as above, class sub-folders included, e.g. `cat/a.png`) and may carry a
  caption column (`caption`, `text` or `prompt`, the first present; `text` is imagefolder's). Its other
  columns (`label`, `source`, ...) are ignored. A metadata file without a caption column gives no
  captions and is no error (the report says it was read without captions), but its rows must still name
  images of the folder.

A row naming no image of the folder, a malformed row and a caption that differs from another source's
caption for the same image are errors naming the table and its line; when any image has a caption,
every image needs one. Caption and metadata tables are never read as images or counted as other files.
Captions enter `References.content_hash` as text, whatever file they come from: the same captions from
sidecars, `captions.*` or `metadata.*` give the same hash, and the ignored metadata columns (or a metadata
file without captions) do not change it.

Every image is converted to the model's channel count (alpha composited on black, 16-bit scaled,
not clipped, to the 8-bit range), center-cropped to the model's aspect ratio if needed and resized
with a Lanczos filter. Anything unusual but valid is listed in `References.report`; anything invalid
raises `InputError` naming the file, before anything is written.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import posixpath
import struct
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.errors import InputError

__all__ = [
    "reference_content_hash",
    "CAPTION_FILES",
    "IMAGE_EXTENSIONS",
    "METADATA_FILES",
    "References",
    "is_hidden",
    "read_references",
    "refuse_output_inside",
]

#: File extensions read as images (lower case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
#: Decoders Pillow may use (camera JPEGs that are MPO files open through the JPEG plugin).
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
#: Root-level caption tables.
CAPTION_FILES = ("captions.jsonl", "captions.csv")
#: Root-level Hugging Face imagefolder metadata: a `file_name` column, optionally a caption column, others ignored.
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_TABLE_FILES = CAPTION_FILES + METADATA_FILES
_METADATA_FILE_KEY = "file_name"
_CAPTION_FILE_KEYS = ("file_name", "file", "image", "path")
_CAPTION_TEXT_KEYS = ("caption", "text", "prompt")
#: Operating-system clutter ignored like hidden files.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
_KNOWN_UNSUPPORTED = {
    ".dcm": "DICOM",
    ".gif": "GIF",
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".avif": "AVIF",
    ".svg": "SVG",
    ".jp2": "JPEG 2000",
}
_HASH_VERSION = b"mmd-augment/references/v1"
_MAX_LISTED = 4


@dataclass
class References:
    """Reference images ready for the encoder, plus what they are and how they were converted.

    Attributes:
        images: float32 [N, channels, H, W] in [-1, 1].
        labels: int64 [N] class ids (index into `class_names`), or None when unlabelled.
        class_names: sorted class folder names, or None when unlabelled.
        captions: one caption per image, or None when there are no captions.
        files: relative POSIX paths, sorted; row i of `images` is `files[i]`.
        content_hash: sha256 hex over sorted (relative path, image file bytes, class, caption text);
            independent of file times, of where the folder lives and of which file a caption comes from
            (sidecar, captions table or metadata table: the bytes of those files are not hashed, so
            metadata columns other than the caption do not count). It does not cover
            `channels`/`size`: key caches on those separately.
        report: human-readable lines about what was found and converted.
        warnings: the lines of `report` a user should see even in a quiet run (valid input that may
            not be what was meant, e.g. images in sub-sub-folders labelled with their top-level class,
            or resizing and cropping that change the images the model sees).
        source: what the files are before conversion, e.g. "128×128 grayscale" or "2 sizes (16×16,
            32×32), grayscale and RGB" (for messages).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    captions: list[str] | None
    files: list[str]
    content_hash: str
    report: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class _Decoded:
    """One image after conversion, with the facts the report needs."""

    pixels: np.ndarray  # float32 [C, H, W] in [0, 255]
    kind: str  # source colour kind: grayscale, RGB, palette, CMYK, ...
    has_alpha: bool
    sixteen_bit: bool
    size: tuple[int, int]  # source (width, height) after EXIF orientation
    cropped: bool
    resized: bool
    rotated: bool
    multi_frame: bool


class _Problems:
    """Collects every problem so the user can fix them all at once; raises one InputError."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{where}: {problem}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        first, more = self.items[0], len(self.items) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise InputError(first + suffix, problems=self.items)


@dataclass
class _Gathered:
    """A reference folder listed and read (bytes, classes, captions), not yet decoded."""

    shown_root: str
    shown: Callable[[str], str]
    problems: _Problems
    found: _Sorted
    class_names: list[str] | None
    notes: list[str]
    warnings: list[str]
    blobs: dict[str, bytes]
    captions_by_image: dict[str, str]


def _gather(path: str, storage_options: dict[str, Any] | None) -> _Gathered:
    """List the folder, sort its files by role, read every file's bytes once (they feed both the decoder and the
    content hash) and the captions; problems are collected, not raised (but a folder without images)."""
    fs, root, shown_root = _open_folder(str(path), storage_options)

    def shown(rel: str) -> str:
        return f"{shown_root}/{rel}" if rel else shown_root

    problems = _Problems()
    listing = _list_tree(fs, root, shown, problems)
    files = {rel: info for rel, info in listing.items() if info.get("type") != "directory"}
    dirs = sorted(rel for rel, info in listing.items() if info.get("type") == "directory")
    found = _sort_files(files, shown, problems)
    images = found.images
    class_names, notes, warnings_ = _layout(images, dirs, listing, shown, problems)
    if not images:
        problems.raise_if_any()  # an unreadable folder or a broken link explains "no images" better
        others = found.others
        more = f"; found only {_plural(len(others), 'other file')}, e.g. {others[0]}" if others else ""
        raise InputError(f"{shown_root}: no images found (supported: {_supported_list()}){more}")
    blobs = _read_blobs(fs, root, images + list(found.sidecars.values()) + found.caption_tables, files, shown, problems)
    captions_by_image = _read_captions(images, found.sidecars, found.caption_tables, blobs, shown, problems, notes)
    return _Gathered(shown_root, shown, problems, found, class_names, notes, warnings_, blobs, captions_by_image)


def reference_content_hash(path: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """`read_references(path).content_hash` without decoding a pixel: the files, classes and captions are read
    and checked as there (InputError naming the first bad file), the images' bytes hashed, not decoded. For
    cache keys that must be known before the references are decoded (the Prefect flow's reference task)."""
    g = _gather(path, storage_options)
    g.problems.raise_if_any()
    images = g.found.images
    captions = [g.captions_by_image[rel] for rel in images] if g.captions_by_image else None
    return _content_hash(images, g.blobs, g.class_names, captions)


def read_references(
    path: str,
    *,
    channels: int,
    size: tuple[int, int],
    min_count: int = 2,
    max_pixels: int = 50_000_000,
    storage_options: dict[str, Any] | None = None,
) -> References:
    """Read, validate and convert a reference folder.

    Args:
        path: local folder or fsspec URL (`memory://refs`, `file:///data/refs`, `s3://bucket/refs`).
        channels: 1 (grayscale, Pillow "L" luma) or 3 (RGB).
        size: model input size (H, W).
        min_count: fewer images than this is an error.
        max_pixels: images with more pixels are refused as decompression bombs, before decoding.
        storage_options: passed to the fsspec filesystem.

    Raises:
        InputError: one line naming the first bad file or the folder (all problems in `.problems`).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (H, W), got {size}")
    g = _gather(path, storage_options)
    shown_root, shown, problems, found = g.shown_root, g.shown, g.problems, g.found
    images, blobs, class_names, captions_by_image = found.images, g.blobs, g.class_names, g.captions_by_image
    report_notes, warnings_ = g.notes, g.warnings
    decoded = _decode_all(images, blobs, channels, (height, width), max_pixels, shown, problems)
    if not problems.items and len(images) < min_count:
        problems.add(
            shown_root,
            f"only {len(images)} image{'s' if len(images) != 1 else ''}; need at least {min_count}",
        )
    problems.raise_if_any()

    return _assemble(
        shown_root,
        found,
        class_names,
        captions_by_image,
        decoded,
        blobs,
        channels,
        (height, width),
        report_notes,
        warnings_,
    )


def refuse_output_inside(ref: str, out: str) -> None:
    """InputError if the output folder `out` is the reference folder `ref` or inside it (local paths):
    the run's own samples would be read as references by the next run."""
    protocol = fsspec.core.split_protocol(str(ref))[0]
    if protocol not in (None, "file", "local"):
        return
    ref_path = Path(fsspec.core.strip_protocol(str(ref))).resolve()
    out_path = Path(out).resolve()
    if out_path == ref_path or ref_path in out_path.parents:
        raise InputError(
            f"{out}: the output folder is inside the reference folder {ref} (the next run would read its "
            "samples as references); choose an --out outside it"
        )


# ----------------------------------------------------------------------------------- the steps of reading


@dataclass
class _Sorted:
    """The folder's files by role: images, caption files, everything else, and what is ignored."""

    images: list[str]  # sorted relative paths of the image files
    sidecars: dict[str, str]  # image rel -> its `<stem>.txt` caption rel
    caption_tables: list[str]  # root-level captions.jsonl / .csv and metadata.jsonl / .csv present
    others: list[str]  # visible files that are neither images nor caption/metadata tables (sidecars included)
    ignored: list[str]  # hidden or system files


def _open_folder(path: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """The filesystem, the root inside it and the folder as messages show it; InputError unless a folder."""
    try:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise InputError(f"{path}: cannot open this location ({e})") from e
    root = root.rstrip("/") or "/"
    shown_root = path.rstrip("/") or path
    if not fs.exists(root):
        raise InputError(f"{shown_root}: reference folder does not exist")
    if not fs.isdir(root):
        raise InputError(f"{shown_root}: not a folder (give the folder that holds the reference images)")
    return fs, root, shown_root


def _sort_files(files: dict[str, dict[str, Any]], shown: Callable[[str], str], problems: _Problems) -> _Sorted:
    """Sort the listed files by role; a caption file without its image and any other file are problems."""
    ignored = sorted(rel for rel in files if is_hidden(rel))
    visible = sorted(rel for rel in files if not is_hidden(rel))
    images = [rel for rel in visible if posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS]
    image_set = set(images)
    sidecars: dict[str, str] = {}  # image rel -> sidecar rel
    caption_tables = [rel for rel in visible if rel in _TABLE_FILES]
    images_by_stem: dict[str, list[str]] = defaultdict(list)
    for img in images:
        images_by_stem[posixpath.splitext(img)[0]].append(img)
    others: list[str] = []
    for rel in visible:
        if rel in image_set or rel in _TABLE_FILES:
            continue
        name = posixpath.basename(rel)
        if name in _TABLE_FILES:  # a table in a sub-folder: never an image nor "other files", but not read
            problems.add(
                shown(rel),
                f"{name} is read only at the root of the folder: move it there, with file names relative "
                f"to the root (e.g. {rel.rsplit('/', 1)[0]}/a.png)",
            )
            continue
        others.append(rel)
        ext = posixpath.splitext(rel)[1].lower()
        if ext == ".txt":
            owners = images_by_stem.get(posixpath.splitext(rel)[0], [])
            if len(owners) == 1:
                sidecars[owners[0]] = rel
            elif not owners:
                problems.add(shown(rel), "caption file has no image with the same name")
            else:
                problems.add(shown(rel), f"caption file matches several images ({', '.join(owners)})")
        elif ext in _KNOWN_UNSUPPORTED:
            problems.add(
                shown(rel),
                f"unsupported image format {_KNOWN_UNSUPPORTED[ext]} (convert to {_supported_list()})",
            )
        else:
            problems.add(shown(rel), f"not an image (supported: {_supported_list()}, captions: .txt)")
    return _Sorted(images, sidecars, caption_tables, others, ignored)


def _layout(
    images: list[str],
    dirs: list[str],
    listing: dict[str, dict[str, Any]],
    shown: Callable[[str], str],
    problems: _Problems,
) -> tuple[list[str] | None, list[str], list[str]]:
    """Labelled (all images in class sub-folders) or unlabelled (all in the root): (class names or None,
    report notes, warnings); a folder that mixes both is a problem."""
    root_images = [rel for rel in images if "/" not in rel]
    nested_images = [rel for rel in images if "/" in rel]
    top_dirs = sorted({d.split("/")[0] for d in dirs if not is_hidden(d)})
    class_names: list[str] | None = None
    report_notes: list[str] = []
    warnings_: list[str] = []
    if root_images and nested_images:
        problems.add(
            shown(""),  # the folder itself
            f"mixes images in the folder itself ({root_images[0]}) with images in sub-folders "
            f"({nested_images[0]}); put every image in a class sub-folder, or none",
        )
    elif nested_images:
        class_names = sorted(set(top_dirs) | {rel.split("/")[0] for rel in nested_images})
        counts = Counter(rel.split("/")[0] for rel in nested_images)
        for name in class_names:
            if counts[name] == 0 and not listing.get(name, {}).get("unlisted"):
                problems.add(shown(name + "/"), "class folder has no images")
        deep = [rel for rel in nested_images if rel.count("/") > 1]
        if deep:
            top = deep[0].split("/")[0]
            warnings_.append(
                f"{_plural(len(deep), 'image')} in sub-sub-folders (e.g. {deep[0]}) labelled with the class of "
                f"their top-level folder ({top}): the classes are the top-level folders only"
            )
            report_notes.append(warnings_[-1])
    elif top_dirs:
        report_notes.append(f"{_plural(len(top_dirs), 'sub-folder')} without images ignored: {_listing(top_dirs)}")
    return class_names, report_notes, warnings_


def _read_blobs(
    fs: fsspec.AbstractFileSystem,
    root: str,
    rels: list[str],
    files: dict[str, dict[str, Any]],
    shown: Callable[[str], str],
    problems: _Problems,
) -> dict[str, bytes]:
    """Relative path -> the file's bytes, for each of `rels` that can be read and is not empty."""
    blobs: dict[str, bytes] = {}
    for rel in rels:
        if files[rel].get("size") == 0:
            problems.add(shown(rel), "empty file (0 bytes)")
            continue
        try:
            with fs.open(f"{root}/{rel}" if root != "/" else f"/{rel}", "rb") as f:
                blobs[rel] = f.read()
        except PermissionError:
            problems.add(shown(rel), "permission denied: cannot read this file")
            continue
        except OSError as e:
            problems.add(shown(rel), f"cannot be read ({e.strerror or e})")
            continue
        if not blobs[rel]:
            problems.add(shown(rel), "empty file (0 bytes)")
            del blobs[rel]
    return blobs


def _decode_all(
    images: list[str],
    blobs: dict[str, bytes],
    channels: int,
    size: tuple[int, int],
    max_pixels: int,
    shown: Callable[[str], str],
    problems: _Problems,
) -> dict[str, _Decoded]:
    """Relative path -> the converted image, for each image whose bytes were read and decode."""
    decoded: dict[str, _Decoded] = {}
    for rel in images:
        if rel not in blobs:
            continue
        try:
            decoded[rel] = _decode(blobs[rel], channels=channels, size=size, max_pixels=max_pixels)
        except _BadImage as e:
            problems.add(shown(rel), str(e))
    return decoded


def _assemble(
    shown_root: str,
    found: _Sorted,
    class_names: list[str] | None,
    captions_by_image: dict[str, str],
    decoded: dict[str, _Decoded],
    blobs: dict[str, bytes],
    channels: int,
    size: tuple[int, int],
    report_notes: list[str],
    warnings_: list[str],
) -> References:
    """The References of a folder read without problems: pixels, labels, captions, hash and report."""
    images = found.images
    labels = None
    if class_names is not None:
        label_of = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([label_of[rel.split("/")[0]] for rel in images], dtype=torch.int64)
    captions = [captions_by_image[rel] for rel in images] if captions_by_image else None
    stack = np.stack([decoded[rel].pixels for rel in images]).astype(np.float32)
    tensor = torch.from_numpy(stack).div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)

    content_hash = _content_hash(images, blobs, class_names, captions)
    report = _report(
        shown_root,
        images,
        decoded,
        class_names,
        captions,
        channels,
        size,
        found.ignored,
        blobs,
        report_notes,
        warnings_,
    )
    return References(
        images=tensor,
        labels=labels,
        class_names=class_names,
        captions=captions,
        files=images,
        content_hash=content_hash,
        report=report,
        warnings=warnings_,
        source=_describe_source([decoded[rel] for rel in images]),
    )


# ----------------------------------------------------------------------------------------------- listing


def _list_tree(
    fs: fsspec.AbstractFileSystem, root: str, shown: Callable[[str], str], problems: _Problems
) -> dict[str, dict[str, Any]]:
    """Relative POSIX path -> {"type", "size"} for everything below `root` (root itself excluded).

    A local folder is walked with symbolic links followed (class folders that are links to folders
    elsewhere are read), with loop protection; a folder that cannot be listed and a link that is broken,
    loops or leads to a folder already read are problems, never silently skipped.
    """
    if isinstance(fs, LocalFileSystem):
        return _list_local(root, shown, problems)
    found = fs.find(root, withdirs=True, detail=True)
    prefix = root.rstrip("/") + "/"
    out: dict[str, dict[str, Any]] = {}
    for name, info in found.items():
        name = name.replace("\\", "/")
        if not name.startswith(prefix):
            continue  # the root itself
        rel = name[len(prefix) :].strip("/")
        if rel:
            out[rel] = info
    return out


def _list_local(root: str, shown: Callable[[str], str], problems: _Problems) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    read_as: dict[str, str] = {os.path.realpath(root): ""}  # real folder -> where it was read (relative)

    def walk(folder: str, prefix: str, ancestors: frozenset[str]) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            reason = "permission denied" if isinstance(e, PermissionError) else e.strerror
            problems.add(shown(prefix), f"{reason}: cannot list this folder")
            if prefix:
                out[prefix.rstrip("/")]["unlisted"] = True  # its problem is said; not also "no images"
            return
        for entry in entries:
            rel = prefix + entry.name
            link = entry.is_symlink()
            if link and is_hidden(rel):
                out[rel] = {"type": "file", "size": None}  # ignored like every hidden file, never followed
                continue
            try:
                is_dir = entry.is_dir()
                size = None if is_dir else entry.stat().st_size
            except OSError as e:
                problems.add(shown(rel), _link_problem(entry.path, e) if link else f"cannot be read ({e.strerror})")
                continue
            if not is_dir:
                out[rel] = {"type": "file", "size": size}
                continue
            real = os.path.realpath(entry.path)
            if real in ancestors:
                problems.add(shown(rel), f"symbolic link loop: leads back to {shown(read_as[real])} (remove the link)")
                continue
            if real in read_as:
                problems.add(shown(rel), f"links to a folder already read as {shown(read_as[real])} (remove one link)")
                continue
            read_as[real] = rel
            out[rel] = {"type": "directory"}
            walk(entry.path, rel + "/", ancestors | {real})

    walk(root, "", frozenset({os.path.realpath(root)}))
    return out


def _link_problem(path: str, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop (the link leads back to itself)"
    target = os.readlink(path) if os.path.islink(path) else "?"
    if error.errno == errno.ENOENT:
        return f"broken symbolic link (its target {target} does not exist)"
    if isinstance(error, PermissionError):
        return f"permission denied: cannot follow the symbolic link to {target}"
    return f"symbolic link to {target} cannot be followed ({error.strerror})"


def is_hidden(rel: str) -> bool:
    """Whether a path relative to the reference folder is skipped: a dot-file or -folder, or OS junk."""
    return any(part.startswith(".") or part.lower() in _JUNK_NAMES for part in rel.split("/"))


def _supported_list() -> str:
    return "PNG, JPEG, TIFF, BMP, WebP"


def _listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------- captions


def _read_captions(
    images: list[str],
    sidecars: dict[str, str],
    tables: list[str],
    blobs: dict[str, bytes],
    shown: Any,
    problems: _Problems,
    notes: list[str],
) -> dict[str, str]:
    """Image rel -> caption, from sidecars, root caption tables and root metadata tables. Empty when there
    are no captions. Report lines on metadata tables (captions or none, columns ignored) go to `notes`."""
    by_image: dict[str, str] = {}
    source: dict[str, str] = {}
    for img, txt in sidecars.items():
        if txt not in blobs:
            continue
        try:
            by_image[img] = blobs[txt].decode("utf-8-sig").strip()
            source[img] = txt
        except UnicodeDecodeError:
            problems.add(shown(txt), "caption file is not UTF-8 text")

    basenames = Counter(posixpath.basename(img) for img in images)
    image_set = set(images)
    for table in tables:
        if table not in blobs:
            continue
        try:
            text = blobs[table].decode("utf-8-sig")
        except UnicodeDecodeError:
            problems.add(shown(table), "not UTF-8 text")
            continue
        entries: list[tuple[str, str, str | None]]
        try:
            if table in METADATA_FILES:
                entries, caption_column, ignored = _parse_metadata_table(table, text)
                notes.append(_metadata_note(table, caption_column, ignored))
            else:
                entries = list(_parse_caption_table(table, text))
        except ValueError as e:
            problems.add(shown(table), str(e))
            continue
        for where, name, caption in entries:
            name = name.replace("\\", "/")
            name = name[2:] if name.startswith("./") else name
            if name in image_set:
                img = name
            elif basenames.get(name) == 1:
                img = next(i for i in images if posixpath.basename(i) == name)
            else:
                reason = "matches several images" if basenames.get(name, 0) > 1 else "names no image"
                problems.add(f"{shown(table)} {where}", f"'{name}' {reason}")
                continue
            if caption is None:  # a metadata table without a caption column: the row only names its image
                continue
            if img in by_image and by_image[img] != caption:
                problems.add(f"{shown(table)} {where}", f"caption for {img} conflicts with the one in {source[img]}")
                continue
            by_image[img] = caption
            source[img] = f"{table} {where}"

    if by_image:
        missing = [img for img in images if img not in by_image]
        if missing:
            problems.add(
                shown(missing[0]),
                f"has no caption, but {len(by_image)} of {len(images)} images do "
                f"({len(missing)} missing); caption every image or none",
            )
    return by_image


def _table_rows(table: str, text: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(location, row) of a `.jsonl` (one JSON object a line; blank lines skipped) or `.csv` (header line)
    table, and its column names in order of first appearance."""
    rows: list[tuple[str, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    if table.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"line {n} is not a JSON object")
            rows.append((f"line {n}", obj))
            columns.update(dict.fromkeys(obj))
    else:
        reader = csv.DictReader(io.StringIO(text))
        for n, obj in enumerate(reader, start=2):
            rows.append((f"line {n}", obj))
        columns.update(dict.fromkeys(name for name in reader.fieldnames or () if name is not None))
    return rows, list(columns)


def _parse_caption_table(table: str, text: str) -> list[tuple[str, str, str]]:
    """(location, file name, caption) rows of captions.jsonl / captions.csv."""
    rows, _ = _table_rows(table, text)
    out = []
    for where, obj in rows:
        file_key = next((k for k in _CAPTION_FILE_KEYS if k in obj), None)
        text_key = next((k for k in _CAPTION_TEXT_KEYS if k in obj), None)
        if file_key is None or text_key is None:
            raise ValueError(
                f"{where} needs a file column ({'/'.join(_CAPTION_FILE_KEYS)}) "
                f"and a caption column ({'/'.join(_CAPTION_TEXT_KEYS)})"
            )
        name, caption = obj[file_key], obj[text_key]
        if not isinstance(name, str) or not isinstance(caption, str):
            raise ValueError(f"{where}: file name and caption must be strings")
        out.append((where, name.strip(), caption.strip()))
    return out


def _parse_metadata_table(table: str, text: str) -> tuple[list[tuple[str, str, str | None]], str | None, list[str]]:
    """Hugging Face imagefolder's metadata.jsonl / metadata.csv: (location, file name, caption or None)
    rows, the caption column (the first of `_CAPTION_TEXT_KEYS` the table has; None when it has none) and
    the other columns, which are ignored. Every row needs a `file_name`, and a caption when the table has
    a caption column."""
    rows, columns = _table_rows(table, text)
    caption_column = next((k for k in _CAPTION_TEXT_KEYS if k in columns), None)
    out: list[tuple[str, str, str | None]] = []
    for where, obj in rows:
        name = obj.get(_METADATA_FILE_KEY)
        if name is None:
            raise ValueError(
                f"{where} has no {_METADATA_FILE_KEY} (Hugging Face imagefolder's metadata names each image, "
                "relative to the folder, in a file_name column)"
            )
        if not isinstance(name, str):
            raise ValueError(f"{where}: {_METADATA_FILE_KEY} must be a string")
        caption = None
        if caption_column is not None:
            caption = obj.get(caption_column)
            if caption is None:
                raise ValueError(f"{where} has no {caption_column} (the caption column of this table)")
            if not isinstance(caption, str):
                raise ValueError(f"{where}: {caption_column} must be a string")
            caption = caption.strip()
        out.append((where, name.strip(), caption))
    ignored = [c for c in columns if c not in (_METADATA_FILE_KEY, caption_column)]
    return out, caption_column, ignored


def _metadata_note(table: str, caption_column: str | None, ignored: list[str]) -> str:
    """The report line on a metadata table: where its captions come from, or that it has none."""
    rest = f"; columns ignored: {_listing(ignored)}" if ignored else ""
    if caption_column is None:
        return f"{table} read without captions (no caption column: {', '.join(_CAPTION_TEXT_KEYS)}){rest}"
    return f"{table}: captions from its {caption_column} column{rest}"


# ---------------------------------------------------------------------------------------------- decoding


class _BadImage(Exception):
    """A per-file problem; becomes one line of an InputError."""


def _decode(data: bytes, *, channels: int, size: tuple[int, int], max_pixels: int) -> _Decoded:
    """Decode, validate and convert one image to float32 [channels, H, W] in [0, 255]."""
    height, width = size
    Image.init()  # register every plugin named in _PIL_FORMATS (MPO, WEBP, ...)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _BadImage(f"refused as a possible decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise _BadImage(f"not a readable image (corrupt, or not {_supported_list()})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise _BadImage(f"corrupt image ({e})") from None
        w, h = im.size
        if w * h > max_pixels:
            raise _BadImage(f"refused as a possible decompression bomb: {w}x{h} = {w * h} pixels > {max_pixels}")
        rawmode = _tile_rawmode(im)
        multi_frame = getattr(im, "n_frames", 1) > 1
        try:
            im.load()  # full decode: catches truncated and corrupt data
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _BadImage(f"refused as a possible decompression bomb ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise _BadImage(f"corrupt or truncated image ({e})") from None

    orientation = im.getexif().get(0x0112, 1)
    rotated = orientation not in (None, 1)
    if rotated:
        im = ImageOps.exif_transpose(im)
    w, h = im.size
    if w < width // 2 or h < height // 2:
        raise _BadImage(f"too small for the model: {w}x{h} < {width // 2}x{height // 2}")

    sixteen_bit = im.mode.startswith("I;16") or _is_16bit_rawmode(rawmode)
    kind = _colour_kind(im.mode, rawmode)
    colour, alpha = _to_float(im)  # [h, w, c] in [0, 255], alpha [h, w] in [0, 1] or None
    if alpha is not None:
        colour = colour * alpha[..., None]  # composite on black
    if channels == 1 and colour.shape[2] == 3:
        # ITU-R 601-2 luma, as Pillow's "L" conversion.
        colour = colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
    elif channels == 3 and colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)

    box, cropped = _center_crop_box(w, h, width, height)
    resized = cropped or (w, h) != (width, height)
    if resized:
        planes = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(colour[..., c]), mode="F").resize(
                    (width, height), Image.Resampling.LANCZOS, box=box
                )
            )
            for c in range(colour.shape[2])
        ]
        colour = np.stack(planes, axis=2)
    pixels = np.clip(colour, 0.0, 255.0).astype(np.float32).transpose(2, 0, 1)
    return _Decoded(
        pixels=np.ascontiguousarray(pixels),
        kind=kind,
        has_alpha=alpha is not None,
        sixteen_bit=sixteen_bit,
        size=(w, h),
        cropped=cropped,
        resized=resized,
        rotated=rotated,
        multi_frame=multi_frame,
    )


def _tile_rawmode(im: Image.Image) -> str | None:
    """The decoder's raw mode before `load()` (e.g. "RGB;16B" for a 48-bit PNG), if known."""
    try:
        args = im.tile[0].args if im.tile else None
    except (AttributeError, IndexError):
        return None
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _is_16bit_rawmode(rawmode: str | None) -> bool:
    """True for 16-bit-per-channel decoders ("RGB;16B", "LA;16B", ...), not for 16-bpp BMP."""
    if not rawmode or ";" not in rawmode:
        return False
    base, suffix = rawmode.split(";", 1)
    return suffix.startswith("16") and base in ("I", "L", "LA", "RGB", "RGBA", "RGBX")


_KIND_BY_MODE = {
    "1": "1-bit",
    "L": "grayscale",
    "LA": "grayscale",
    "La": "grayscale",
    "I": "grayscale",
    "P": "palette",
    "PA": "palette",
    "RGB": "RGB",
    "RGBA": "RGB",
    "RGBa": "RGB",
    "RGBX": "RGB",
}


def _colour_kind(mode: str, rawmode: str | None) -> str:
    """Colour kind of the source for the report (alpha is reported separately)."""
    if mode.startswith("I;16"):
        return "grayscale"
    if rawmode and rawmode.split(";")[0] in ("LA", "L") and mode in ("RGBA", "RGB"):
        return "grayscale"  # Pillow decodes 16-bit grayscale(+alpha) PNGs as 8-bit RGB(A)
    return _KIND_BY_MODE.get(mode, mode)


def _to_float(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour [h, w, 1 or 3] float32 in [0, 255] and alpha [h, w] in [0, 1] (None if opaque)."""
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode.startswith("I;16"):
        if mode not in ("I;16", "I;16L", "I;16B", "I;16N"):
            raise _BadImage(f"unsupported pixel type {mode} (save as 8- or 16-bit unsigned)")
        raw = np.asarray(im)
        colour = (raw.astype(np.float32) * (255.0 / 65535.0))[..., None]  # scale, never clip
        alpha = None
        if isinstance(transparency, int):
            alpha = (raw != transparency).astype(np.float32)
        return colour, alpha
    if mode in ("I", "F"):
        what = "32-bit integer" if mode == "I" else "floating-point"
        raise _BadImage(f"unsupported pixel type ({what}); save the image as 8- or 16-bit")
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or transparency is not None else "RGB")
    elif mode == "L" and transparency is not None:
        im = im.convert("LA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGB" and transparency is not None:
        im = im.convert("RGBA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        try:
            im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
        except ValueError as e:
            raise _BadImage(f"unsupported pixel type {mode} ({e})") from None
    arr = np.asarray(im, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if im.mode in ("LA", "RGBA"):
        return arr[..., :-1], arr[..., -1] / 255.0
    return arr, None


def _center_crop_box(w: int, h: int, width: int, height: int) -> tuple[tuple[float, float, float, float], bool]:
    """Source box with the target aspect ratio, centred; and whether it crops anything."""
    if w * height == h * width:
        return (0.0, 0.0, float(w), float(h)), False
    if w * height > h * width:  # too wide
        new_w = h * width / height
        left = (w - new_w) / 2
        return (left, 0.0, left + new_w, float(h)), True
    new_h = w * height / width
    top = (h - new_h) / 2
    return (0.0, top, float(w), top + new_h), True


# ---------------------------------------------------------------------------------------- hash and report


def _content_hash(
    files: list[str], blobs: dict[str, bytes], class_names: list[str] | None, captions: list[str] | None
) -> str:
    """sha256 over sorted (relative path, file bytes, class, caption), length-prefixed."""
    h = hashlib.sha256(_HASH_VERSION)

    def field_(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for i, rel in enumerate(files):
        field_(rel.encode("utf-8"))
        field_(hashlib.sha256(blobs[rel]).digest())
        field_(b"" if class_names is None else b"class:" + rel.split("/")[0].encode("utf-8"))
        field_(b"" if captions is None else b"caption:" + captions[i].encode("utf-8"))
    return h.hexdigest()


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}{'es' if word.endswith(('s', 'x', 'sh', 'ch')) else 's'}"


def _report(
    shown_root: str,
    files: list[str],
    decoded: dict[str, _Decoded],
    class_names: list[str] | None,
    captions: list[str] | None,
    channels: int,
    size: tuple[int, int],
    ignored: list[str],
    blobs: dict[str, bytes],
    notes: list[str],
    warns: list[str],
) -> list[str]:
    """The report's lines; those a user should see even in a quiet run are also appended to `warns`."""
    target = "grayscale" if channels == 1 else "RGB"
    if class_names is not None:
        counts = Counter(rel.split("/")[0] for rel in files)
        per_class = _listing([f"{name} ({counts[name]})" for name in class_names], limit=8)
        layout = f"{_plural(len(class_names), 'class')}: {per_class}"
    else:
        layout = "unlabelled"
    with_captions = ", with captions" if captions is not None else ""
    lines = [f"{_plural(len(files), 'image')} read from {shown_root}, {layout}{with_captions}"]

    items = [decoded[rel] for rel in files]
    lines.extend(_conversion_lines(items, target))
    lines.extend(_geometry_lines(items, size, target, warns))
    lines.extend(_duplicate_lines(files, blobs))
    lines.extend(notes)
    if ignored:
        lines.append(f"{_plural(len(ignored), 'hidden or system file')} ignored: {_listing(ignored)}")
    return lines


def _conversion_lines(items: list[_Decoded], target: str) -> list[str]:
    """Report lines on colour, transparency, bit depth, orientation and frames converted."""
    lines = []
    kinds = Counter(d.kind for d in items if d.kind != target)
    for kind, n in sorted(kinds.items()):
        lines.append(f"{_plural(n, 'image')} converted from {kind} to {target}")
    n_alpha = sum(d.has_alpha for d in items)
    if n_alpha:
        lines.append(f"{_plural(n_alpha, 'image')} with transparency composited on black")
    n16 = sum(d.sixteen_bit for d in items)
    if n16:
        lines.append(f"{n16} 16-bit image{'s' if n16 != 1 else ''} scaled to 8-bit")
    n_rot = sum(d.rotated for d in items)
    if n_rot:
        lines.append(f"{_plural(n_rot, 'image')} rotated as their EXIF orientation says")
    n_multi = sum(d.multi_frame for d in items)
    if n_multi:
        lines.append(f"{_plural(n_multi, 'multi-frame image')}: first frame used")
    return lines


def _geometry_lines(items: list[_Decoded], size: tuple[int, int], target: str, warns: list[str]) -> list[str]:
    """Report lines on sizes, resizing and cropping; resizing and cropping are also appended to `warns`."""
    height, width = size
    lines = []
    sizes = Counter(d.size for d in items)
    mixed = ""
    if len(sizes) > 1:
        listed = [f"{w}x{h}" for (w, h) in sorted(sizes)]
        mixed = f" (mixed sizes: {_listing(listed)})"
    resized_from: dict[tuple[int, int], int] = defaultdict(int)
    for d in items:
        if d.resized:
            resized_from[d.size] += 1
    if resized_from:  # resampling changes what the model sees: a warning, naming both sizes and the channels
        n_resized = sum(resized_from.values())
        some = "" if n_resized == len(items) else f" (from {_sizes(resized_from)})"
        lines.append(
            f"references are {_describe_source(items)}; the model draws {width}×{height} {target}: resizing "
            f"{_plural(n_resized, 'image')}{some}"
        )
        warns.append(lines[-1])
    elif mixed:
        lines.append(f"input sizes vary{mixed}")
    n_crop = sum(d.cropped for d in items)
    if n_crop:
        g = math.gcd(width, height)
        lines.append(
            f"{_plural(n_crop, 'image')} center-cropped to the model's aspect ratio "
            f"{width // g}:{height // g} (width:height) before resizing"
        )
        warns.append(lines[-1])
    return lines


def _duplicate_lines(files: list[str], blobs: dict[str, bytes]) -> list[str]:
    """A report line on files byte-identical to another reference, if any."""
    digests: dict[str, list[str]] = defaultdict(list)
    for rel in files:
        digests[hashlib.sha256(blobs[rel]).hexdigest()].append(rel)
    duplicates = [group for group in digests.values() if len(group) > 1]
    if not duplicates:
        return []
    n_dup = sum(len(g) - 1 for g in duplicates)
    example = " = ".join(duplicates[0][:3])
    return [f"{_plural(n_dup, 'file')} byte-identical to another reference (e.g. {example})"]


def _sizes(sizes: Counter | dict[tuple[int, int], int]) -> str:
    return _listing([f"{w}×{h}" for (w, h) in sorted(sizes)])


def _describe_source(items: list[_Decoded]) -> str:
    """What decoded files were before conversion: "128×128 grayscale", "3 sizes (16×16, 32×32, 48×32),
    grayscale and RGB" (sizes as width×height, after EXIF orientation)."""
    sizes = Counter(d.size for d in items)
    size = _sizes(sizes) if len(sizes) == 1 else f"{len(sizes)} sizes ({_sizes(sizes)})"
    kinds = sorted({d.kind for d in items})
    colour = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    return f"{size}{',' if len(sizes) > 1 else ''} {colour}"
