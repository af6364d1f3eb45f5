"""Train a small classifier on synthetic shards mixed with real labelled images: the example to copy.

    python examples/train_classifier.py \
        --shards "out/demo/shards/synthetic-{000000..000001}.tar" \
        --real examples/thick_digits --synthetic-fraction 0.5 --steps 300 --eval-dir heldout/

    torchrun --nproc_per_node 2 examples/train_classifier.py --shards ... --real ...   # data-parallel

Synthetic samples stream from WebDataset shards (shard shuffle, sample shuffle buffer, decode,
batching in the workers, `WebLoader`), real images come from a class-folder tree, and both are mixed
at `--synthetic-fraction`. Under torchrun each rank reads its own subset of the shards
(`split_by_node`) and gradients are averaged with DistributedDataParallel (gloo on CPU).
Only torch, webdataset, numpy and Pillow: no project imports.

`--recipe` (how the synthetic samples join the real ones, as in `augment utility`):
  mix       one stream, `--synthetic-fraction` of each batch synthetic (0.5: the decision suite's balanced)
  finetune  the mix for --steps, then the real images alone for a third as many steps at a tenth of --lr
  pretrain  the synthetic samples alone for --steps, then the same fine-tuning on the real images
`--affine` (standard random-affine augmentation: rotation ±10°, shift ±2 px, scale 0.9-1.1, shear ±10°):
  none, real (the real images only) or all (real and synthetic samples).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch import nn

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
RECIPES = ("mix", "finetune", "pretrain")
AFFINE = ("none", "real", "all")
FINETUNE_FRACTION = 1 / 3  # finetune / pretrain: fine-tuning steps on the real images, as a share of --steps
FINETUNE_LR_FACTOR = 0.1  # ... at this fraction of --lr (a fresh AdamW, cosine decay to 0)


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> [1, size, size] float in [−1, 1] (grayscale)."""
    image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)[None]


def random_affine(image: torch.Tensor) -> torch.Tensor:
    """One random affine map of a [C, H, W] image (rotation ±10°, translation ±2 px, scale 0.9-1.1, shear
    ±10°; bilinear, border pixels repeat), drawn from torch's generator (seeded per rank and per worker)."""
    _, h, w = image.shape
    u = torch.rand(5)
    angle, shear = torch.deg2rad(20 * u[0] - 10), torch.tan(torch.deg2rad(20 * u[1] - 10))
    scale = 0.9 + 0.2 * u[2]
    shift = (4 * u[3:5] - 2) * torch.tensor([2.0 / w, 2.0 / h])
    cos, sin = torch.cos(angle), torch.sin(angle)
    shear_m = torch.eye(2)
    shear_m[0, 1] = shear
    a = scale * torch.stack([torch.stack([cos, -sin]), torch.stack([sin, cos])]) @ shear_m
    a_inv = torch.linalg.inv(a)
    theta = torch.cat([a_inv, -(a_inv @ shift[:, None])], dim=1)[None]
    grid = nn.functional.affine_grid(theta, [1, *image.shape], align_corners=False)
    return nn.functional.grid_sample(image[None], grid, padding_mode="border", align_corners=False)[0]


def class_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) for a folder of class sub-folders (sorted class names -> 0..K−1)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [
        (f, i)
        for i, c in enumerate(classes)
        for f in sorted((root / c).rglob("*"))
        if f.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not items:
        raise SystemExit(f"{root}: no images in class sub-folders")
    return items, classes


class RealImages(torch.utils.data.IterableDataset):
    """An endless shuffled stream of (image, label) from a class-folder tree (split across ranks/workers)."""

    def __init__(self, items: list[tuple[Path, int]], size: int, seed: int, affine: bool = False):
        self.items, self.size, self.seed, self.affine = items, size, seed, affine

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.items[rank * workers + worker :: world * workers] or self.items
        rng = random.Random(self.seed + 1000 * rank + worker)
        while True:
            order = list(mine)
            rng.shuffle(order)
            for path, label in order:
                image = to_tensor(Image.open(path), self.size)
                yield (random_affine(image) if self.affine else image), label


def synthetic_stream(urls: list[str], size: int, shuffle: int, seed: int, classes: list[str], affine: bool = False):
    """WebDataset pipeline over the augment shards: png + json -> (image, label), endless.

    Labels come from each sample's `class_name` (its reference class folder), so they line up with the
    real folder's classes by name. `affine`: each sample gets its own `random_affine` map.
    """
    index = {name: i for i, name in enumerate(classes)}

    def to_pair(sample):
        image, meta = sample
        x = to_tensor(image, size)
        return (random_affine(x) if affine else x), index[meta["class_name"]]

    return (
        wds.WebDataset(
            [u for pattern in urls for u in braceexpand(pattern)],
            resampled=True,
            shardshuffle=True,
            nodesplitter=wds.split_by_node,
            seed=seed,
        )
        .shuffle(shuffle)
        .decode("pil")
        .to_tuple("png", "json")
        .map(to_pair)
    )


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def evaluate(model: nn.Module, items: list[tuple[Path, int]], size: int, classes: list[str]) -> dict:
    """Held-out accuracy, overall and per class (keyed by class name)."""
    model.eval()
    x = torch.stack([to_tensor(Image.open(p), size) for p, _ in items])
    y = torch.tensor([label for _, label in items])
    pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    per_class = {classes[int(c)]: float((pred[y == c] == c).float().mean()) for c in y.unique()}
    model.train()
    return {"accuracy": float((pred == y).float().mean()), "per_class": per_class, "n": len(y)}


def fit(model, loader, opt, sched, steps: int, rank: int, log_every: int, first_step: int = 0) -> None:
    """`steps` optimiser steps on batches of `loader` (cross-entropy), logging every `log_every` steps."""
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        loss = loss_fn(model(x), torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step = first_step + i
        if rank == 0 and log_every and step % log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)


def train(args: argparse.Namespace) -> dict:
    """Train and (optionally) evaluate; returns the metrics. Callable from Python with a Namespace."""
    recipe, affine = getattr(args, "recipe", "mix"), getattr(args, "affine", "none")
    if recipe not in RECIPES or affine not in AFFINE:
        raise SystemExit(f"--recipe is one of {RECIPES}, --affine one of {AFFINE}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed + rank)
    real_items, classes = class_folder(args.real) if args.real else ([], None)
    classes = args.classes.split(",") if args.classes else classes
    if not classes:
        raise SystemExit("give --real (a class-folder tree) or --classes a,b,c to name the classes")
    if recipe != "mix" and not real_items:
        raise SystemExit(f"--recipe {recipe} fine-tunes on the real images: give --real")
    if recipe == "pretrain" and not args.shards:
        raise SystemExit("--recipe pretrain trains on the synthetic samples first: give --shards")
    # pretrain: the synthetic samples alone first; mix / finetune: the mix at --synthetic-fraction
    fraction = 1.0 if recipe == "pretrain" else args.synthetic_fraction
    sources, probs = [], []
    if args.shards and fraction > 0:
        sources.append(
            synthetic_stream(args.shards, args.size, args.shuffle_buffer, args.seed, classes, affine=affine == "all")
        )
        probs.append(fraction)
    if real_items and fraction < 1:
        sources.append(RealImages(real_items, args.size, args.seed, affine=affine != "none"))
        probs.append(1 - fraction)
    if not sources:
        raise SystemExit("nothing to train on: give --shards and/or --real (and a matching --synthetic-fraction)")
    data = sources[0] if len(sources) == 1 else wds.RandomMix(sources, probs)
    loader = wds.WebLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    model = SmallCNN(len(classes))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    fit(model, loader, opt, sched, args.steps, rank, args.log_every)
    total = args.steps
    if recipe in ("finetune", "pretrain"):  # then the real images alone, at a lower lr
        more = max(1, round(FINETUNE_FRACTION * args.steps))
        real = RealImages(real_items, args.size, args.seed + 1, affine=affine != "none")
        loader = wds.WebLoader(real, batch_size=args.batch_size, num_workers=args.workers)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr * FINETUNE_LR_FACTOR, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=more)
        fit(model, loader, opt, sched, more, rank, args.log_every, first_step=args.steps)
        total += more
    result: dict = {"steps": total, "classes": classes, "recipe": recipe, "affine": affine}
    net = model.module if distributed else model
    if args.eval_dir and rank == 0:
        eval_items, eval_classes = class_folder(args.eval_dir)
        eval_items = [(p, classes.index(eval_classes[i])) for p, i in eval_items]
        result["eval"] = evaluate(net, eval_items, args.size, classes)
        print(json.dumps(result["eval"]), flush=True)
    if args.save and rank == 0:
        torch.save(net.state_dict(), args.save)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", nargs="+", help="WebDataset URL(s) or brace patterns (shard-{000000..000009}.tar)")
    ap.add_argument("--real", help="real labelled images: a folder of class sub-folders")
    ap.add_argument("--synthetic-fraction", type=float, default=0.5, help="share of synthetic samples in a batch")
    ap.add_argument("--recipe", choices=RECIPES, default="mix", help="mix, finetune or pretrain (see above)")
    ap.add_argument("--affine", choices=AFFINE, default="none", help="random-affine augmentation of: none, real, all")
    ap.add_argument("--eval-dir", help="held-out labelled folder to report accuracy on")
    ap.add_argument("--classes", help="comma-separated class names (default: the --real folder's)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save", help="write the trained weights here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
