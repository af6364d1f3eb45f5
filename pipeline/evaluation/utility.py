"""What synthetic data is worth: train the same small classifier on real, real+synthetic, synthetic alone
and real+unguided samples, and compare held-out accuracy on real target data.

(a) real train part alone, (b) real + synthetic (the run), (c) synthetic alone, (d) real + unguided prior
samples of the same count (another run with `--guidance none`). Same architecture, optimiser, number of
steps and seeds for every arm; mean and spread over seeds; per-class accuracy. Labels are matched across
sources by class *name* (the reference class folders).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from storage.errors import InputError
from storage.eval_io import read_samples
from storage.references import read_references


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: a quick, honest probe of data quality on small images."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class LabelledImages:
    images: torch.Tensor  # [n, C, H, W] in [−1, 1]
    labels: torch.Tensor  # [n] indices into `classes`
    classes: list[str]


def run_samples(run_dir: str | Path, classes: list[str], limit: int | None = None) -> LabelledImages:
    """Kept samples of an `augment` run (in manifest order), labelled by class name."""
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    prefix = record["config"]["prefix"]
    table = pq.read_table(run_dir / "manifest.parquet", columns=["key", "shard", "kept", "class_name"])
    rows = [r for r in table.to_pylist() if r["kept"]]
    if not rows or rows[0]["class_name"] is None:
        raise InputError(f"{run_dir}: the utility evaluation needs a labelled run (class sub-folders as references)")
    rows = rows[:limit] if limit else rows
    _, pixels, metas = read_samples(run_dir, prefix, [(r["shard"], r["key"]) for r in rows])
    unknown = {m["class_name"] for m in metas} - set(classes)
    if unknown:
        raise InputError(f"{run_dir}: classes {sorted(unknown)} are not in the real folder's {classes}")
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = torch.tensor([classes.index(m["class_name"]) for m in metas])
    return LabelledImages(images, labels, classes)


def folder_images(path: str | Path, channels: int, size: int) -> LabelledImages:
    refs = read_references(str(path), channels=channels, size=(size, size))
    if refs.labels is None:
        raise InputError(f"{path}: the utility evaluation needs class sub-folders (labelled images)")
    return LabelledImages(refs.images, refs.labels, list(refs.class_names))


def split_real(real: LabelledImages, test_fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Stratified, seeded train/test split of the real labelled images."""
    gen = torch.Generator().manual_seed(seed)
    test = []
    for c in real.labels.unique():
        members = (real.labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        test.extend(members[: max(1, int(round(test_fraction * len(members))))].tolist())
    mask = torch.zeros(len(real.labels), dtype=torch.bool)
    mask[test] = True
    pick = lambda m: LabelledImages(real.images[m], real.labels[m], real.classes)  # noqa: E731
    return pick(~mask), pick(mask)


def train_and_test(
    train: LabelledImages, test: LabelledImages, seed: int, steps: int = 600, batch_size: int = 64, lr: float = 3e-3
) -> dict[str, Any]:
    """Train SmallCNN for a fixed number of steps (mild shift augmentation), report test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(train.images.shape[1], len(train.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train.labels), (batch_size,), generator=gen)
        x = train.images[idx]
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))  # mild translation augmentation, same for every arm
        loss = loss_fn(model(x), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in test.images.split(512)])
    per_class = {
        test.classes[int(c)]: float((pred[test.labels == c] == c).float().mean()) for c in test.labels.unique()
    }
    return {"accuracy": float((pred == test.labels).float().mean()), "per_class": per_class}


def _concat(*parts: LabelledImages) -> LabelledImages:
    return LabelledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]), parts[0].classes)


def utility_eval(
    run_dir: str | Path,
    real: str | Path,
    *,
    unguided_run: str | Path | None = None,
    real_test: str | Path | None = None,
    test_fraction: float = 0.4,
    seeds: int = 3,
    steps: int = 600,
    limit: int | None = None,
) -> dict[str, Any]:
    """Held-out accuracy (mean ± std over seeds, per class) for the arms (a)-(d)."""
    real_all = None
    if real_test is None:
        real_all = folder_images(real, channels=1, size=32)
        real_train, test = split_real(real_all, test_fraction, seed=0)
    else:
        real_train = folder_images(real, channels=1, size=32)
        test = folder_images(real_test, channels=1, size=32)
        if test.classes != real_train.classes:
            raise InputError(f"{real_test}: classes {test.classes} differ from {real}'s {real_train.classes}")
    size = real_train.images.shape[-1]
    classes = real_train.classes
    synthetic = run_samples(run_dir, classes, limit)
    if synthetic.images.shape[-1] != size or synthetic.images.shape[1] != real_train.images.shape[1]:
        synthetic.images = torch.nn.functional.interpolate(synthetic.images, size=(size, size), mode="bilinear")
    arms = {"a_real": real_train, "b_real_plus_synthetic": _concat(real_train, synthetic), "c_synthetic": synthetic}
    if unguided_run is not None:
        arms["d_real_plus_unguided"] = _concat(real_train, run_samples(unguided_run, classes, len(synthetic.labels)))
    results: dict[str, Any] = {
        "settings": {
            "run": str(run_dir),
            "real": str(real),
            "real_test": str(real_test) if real_test else None,
            "unguided_run": str(unguided_run) if unguided_run else None,
            "seeds": seeds,
            "steps": steps,
            "n_real_train": len(real_train.labels),
            "n_test": len(test.labels),
            "n_synthetic": len(synthetic.labels),
            "classes": classes,
        },
        "arms": {},
    }
    for name, train in arms.items():
        runs = [train_and_test(train, test, seed, steps=steps) for seed in range(seeds)]
        acc = np.array([r["accuracy"] for r in runs])
        per_class = {c: float(np.mean([r["per_class"].get(c, np.nan) for r in runs])) for c in classes}
        results["arms"][name] = {
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "accuracies": acc.tolist(),
            "per_class": per_class,
            "n_train": len(train.labels),
        }
    return results


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the arms."""
    lines = ["| arm | train images | held-out accuracy (mean ± std) |", "|---|---|---|"]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['n_train']} | {arm['accuracy_mean']:.3f} ± {arm['accuracy_std']:.3f} |")
    return "\n".join(lines)
