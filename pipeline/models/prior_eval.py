"""Evaluation helpers of the shipped prior: sampling through the pipeline's own loop, the classifier's
probabilities and features, PSNR, sample grids and class summaries (used by the model card, the MCLR
fine-tuning check and the null-class probe)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models.shipped import DigitClassifier


@dataclass
class SampleRun:
    images: torch.Tensor  # [n, C, H, W] in [-1, 1]
    labels: torch.Tensor  # requested labels (null id for unconditional)
    sampling_seconds: float  # denoiser loop only
    decode_seconds: float


def sample_prior(
    prior: Any,
    labels: torch.Tensor,
    seed: int,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    ig_scale: float = 1.0,
    batch_size: int = 250,
    progress: Callable[[int], None] | None = None,
    eta: float = 1.0,
) -> SampleRun:
    """Sample len(labels) images from a `ShippedPrior` with the pipeline's own sampling loop and seeds.

    Sample i's noise comes from `pipeline.seeding.sample_seed(seed, i)`, so results do not depend on
    the batch size; DDIM with the prior's scheduler, IG inside each branch, CFG on top.
    """
    from pipeline.models.adapters import InternalGuidanceUNetAdapter
    from pipeline.models.sampling import sample_latents
    from pipeline.seeding import sample_seed

    device = prior.unet.unet.device
    denoiser = InternalGuidanceUNetAdapter(prior.unet, null_class=int(prior.info["null_class_id"]))
    samp = dec = 0.0
    images = []
    for start in range(0, len(labels), batch_size):
        batch = labels[start : start + batch_size]
        seeds = [sample_seed(seed, i) for i in range(start, start + len(batch))]
        t0 = time.perf_counter()
        with torch.no_grad():
            z = sample_latents(
                denoiser,
                prior.scheduler,
                seeds,
                num_steps=num_steps,
                condition=batch.to(device),
                cfg_scale=cfg_scale,
                ig_scale=ig_scale,
                eta=eta,
                device=device,
            ).latents
            t1 = time.perf_counter()
            images.append(prior.decode(z).cpu())
        dec += time.perf_counter() - t1
        samp += t1 - t0
        if progress is not None:
            progress(len(batch))
    return SampleRun(torch.cat(images), labels, samp, dec)


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Softmax probabilities and penultimate features (float64) of `images`, on the CPU."""
    device = next(classifier.parameters()).device
    probs, feats = [], []
    for start in range(0, len(images), batch_size):
        f = classifier.features(images[start : start + batch_size].to(device))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(classifier.fc(f), dim=1).cpu())
    return {"probs": torch.cat(probs), "features": torch.cat(feats)}


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale (peak 1)."""
    mse = (((x.clamp(-1, 1) - y) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, pad: int = 2) -> None:
    """Save images in [-1, 1] as one PNG grid (row-major, `nrow` images per row)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y0 : y0 + h, x0 : x0 + w] = (im.clamp(-1, 1) + 1) / 2
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)


def class_summary(probs: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> dict[str, Any]:
    pred = probs.argmax(1)
    conf = probs.max(1).values
    confident = conf > 0.9
    out: dict[str, Any] = {
        "confident_fraction": float(confident.float().mean()),
        "confident_histogram": torch.bincount(pred[confident], minlength=num_classes).tolist(),
        "predicted_histogram": torch.bincount(pred, minlength=num_classes).tolist(),
    }
    if labels is not None:
        out["class_accuracy"] = float((pred == labels).float().mean())
    hist = np.asarray(out["confident_histogram"], dtype=np.float64)
    if hist.sum() > 0:
        p = hist / hist.sum()
        ent = -(p[p > 0] * np.log(p[p > 0])).sum()
        out["confident_histogram_normalised_entropy"] = float(ent / math.log(num_classes))
        out["confident_histogram_max_over_min"] = float(hist.max() / max(hist.min(), 1.0))
    return out
