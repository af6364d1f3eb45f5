"""Cost of the Internal-Guidance head: a sampling forward of the shipped UNet with and without its head.

    python benchmarks/ig_head_cost.py [--batch 250] [--repeats 30]
    python benchmarks/ig_head_cost.py --smoke     # batch 4, 2 repeats (the test suite)

The head (GroupNorm-SiLU-conv after `up_blocks.0`) runs inside the same call, so its cost is the ratio of
the two timings, measured interleaved in one process (absolute times on a shared CPU are noise).
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models.shipped import load_shipped


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="batch 4, 2 repeats (the test suite)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.repeats = 4, 2
    prior = load_shipped()
    model = prior.unet
    c, h, w = prior.info["latent_shape"]
    z = torch.randn(args.batch, c, h, w)
    t = torch.full((args.batch,), 500)
    y = torch.arange(args.batch) % int(prior.info["num_classes"])
    times = {"with head": [], "without head": []}
    with torch.no_grad():
        for _ in range(3):
            model(z, t, y)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(z, t, y)
            times["with head"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.unet(z, t, class_labels=y)
            times["without head"].append(time.perf_counter() - t0)
    median = {k: 1000 * float(torch.tensor(v).median()) for k, v in times.items()}
    ratio = median["with head"] / median["without head"]
    print(f"median ms per call: {median}; with/without head = {ratio:.3f}")
    return {**median, "ratio": ratio}


if __name__ == "__main__":
    main()
