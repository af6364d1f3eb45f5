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


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> [1, size, size] float in [−1, 1] (grayscale)."""
    image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)[None]


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

    def __init__(self, items: list[tuple[Path, int]], size: int, seed: int):
        self.items, self.size, self.seed = items, size, seed

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
                yield to_tensor(Image.open(path), self.size), label


def synthetic_stream(urls: list[str], size: int, shuffle: int, seed: int, classes: list[str]):
    """WebDataset pipeline over the augment shards: png + json -> (image, label), endless.

    Labels come from each sample's `class_name` (its reference class folder), so they line up with the
    real folder's classes by name.
    """
    index = {name: i for i, name in enumerate(classes)}

    def to_pair(sample):
        image, meta = sample
        return to_tensor(image, size), index[meta["class_name"]]

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


def train(args: argparse.Namespace) -> dict:
    """Train and (optionally) evaluate; returns the metrics. Callable from Python with a Namespace."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed + rank)
    real_items, classes = class_folder(args.real) if args.real else ([], None)
    classes = args.classes.split(",") if args.classes else classes
    if not classes:
        raise SystemExit("give --real (a class-folder tree) or --classes a,b,c to name the classes")
    sources, probs = [], []
    if args.shards and args.synthetic_fraction > 0:
        sources.append(synthetic_stream(args.shards, args.size, args.shuffle_buffer, args.seed, classes))
        probs.append(args.synthetic_fraction)
    if real_items and args.synthetic_fraction < 1:
        sources.append(RealImages(real_items, args.size, args.seed))
        probs.append(1 - args.synthetic_fraction)
    if not sources:
        raise SystemExit("nothing to train on: give --shards and/or --real (and a matching --synthetic-fraction)")
    data = sources[0] if len(sources) == 1 else wds.RandomMix(sources, probs)
    loader = wds.WebLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    model = SmallCNN(len(classes))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    loss_fn = nn.CrossEntropyLoss()
    for step, (x, y) in enumerate(loader):
        if step >= args.steps:
            break
        loss = loss_fn(model(x), torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if rank == 0 and args.log_every and step % args.log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    result: dict = {"steps": args.steps, "classes": classes}
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
