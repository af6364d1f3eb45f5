"""Make the two labelled target domains of the utility evidence (docs/results.md, section 4).

For each domain, with the shift of its example folder (`make_example_refs.thicken`: 3x3 dilation;
`make_slanted_refs.thin_and_slant`: erosion + italic shear), from the prior's HELD-OUT rows only
(`pipeline.models.prior_data.mnist_split`: 100 rows per class the prior never trains on):
  <out>/<domain>/refs/<class>/   120 labelled references: thick 45/30/30/15 of 0/1/3/7, slanted 30 each
                                 of 2/5/6/9 (the first held-out rows of each class, in index order);
  <out>/<domain>/test/<class>/   every other held-out row of those classes, shifted the same way: the real
                                 test set of the downstream classifiers, disjoint from the references.
(An earlier version took the test images from the prior's training rows: digits the prior had seen.)
The nine-domain suite of docs/results.md §5 is `benchmarks/domain_suite.py`. Needs the `train` extra.

    python examples/make_utility_domains.py [--out runs/utility-data]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from make_example_refs import thicken
from make_slanted_refs import thin_and_slant
from PIL import Image

HERE = Path(__file__).resolve().parent
DOMAINS = {
    "thick": (thicken, {0: 45, 1: 30, 3: 30, 7: 15}),
    "slanted": (thin_and_slant, {2: 30, 5: 30, 6: 30, 9: 30}),
}


def write(folder: Path, digit: int, rows: np.ndarray, pixels: np.ndarray) -> None:
    (folder / str(digit)).mkdir(parents=True, exist_ok=True)
    for row, arr in zip(rows, pixels, strict=True):
        Image.fromarray(arr, mode="L").save(folder / str(digit) / f"mnist{int(row):04d}.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE.parent / "runs" / "utility-data")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from pipeline.models.prior_data import load_mnist_arrays, mnist_split

    images, labels = load_mnist_arrays()
    images = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28)
    _, heldout = mnist_split()
    for name, (shift, counts) in DOMAINS.items():
        root = args.out / name
        if root.exists():
            shutil.rmtree(root)
        tests = 0
        for digit, count in counts.items():
            rows = heldout[labels[heldout] == digit]
            if len(rows) <= count:
                raise SystemExit(f"{name}: only {len(rows)} held-out images of class {digit}, need more than {count}")
            ref_rows, test_rows = rows[:count], rows[count:]
            write(root / "refs", digit, ref_rows, shift(images[ref_rows]))
            write(root / "test", digit, test_rows, shift(images[test_rows]))
            tests += len(test_rows)
        print(f"{name}: {sum(counts.values())} references {counts}, {tests} test images -> {root}")


if __name__ == "__main__":
    main()
