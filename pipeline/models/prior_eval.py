"""Evaluation of the shipped prior for its model card: a minimal deterministic DDIM sampler with
classifier-free guidance and Internal Guidance, and the metrics the card reports.

This sampler is deliberately small and self-contained (the project's sampling loop lives in
`pipeline.sampling`); it exists so the model card can be reproduced from the training code alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models.shipped import DigitClassifier, InternalGuidanceUNet


def noise_for_indices(indices: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial noise of sample i from its own generator seeded with (seed, i): batch-size independent."""
    out = torch.empty((len(indices), *shape))
    for row, i in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        out[row] = torch.randn(shape, generator=g)
    return out


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """'trailing' spacing (Lin et al. 2023, table 2): starts at T-1, so the first step sees pure noise."""
    return [int(round(t)) - 1 for t in np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)]


@torch.no_grad()
def guided_epsilon(
    model: InternalGuidanceUNet,
    x: torch.Tensor,
    t: int,
    labels: torch.Tensor,
    null_id: int,
    cfg_scale: float = 1.0,
    ig_scale: float = 1.0,
) -> torch.Tensor:
    """epsilon with IG inside each branch, CFG on top; one batched backbone call.

    IG:  e = e_head + w_ig (e_main - e_head)          (Internal Guidance, w_ig = 1: plain model)
    CFG: e = e_null + w_cfg (e_cond - e_null)          (Ho & Salimans 2022, w_cfg = 1: conditional)
    """
    use_cfg = cfg_scale != 1.0 and bool((labels != null_id).any())
    if use_cfg:
        xin = torch.cat([x, x])
        lab = torch.cat([labels, torch.full_like(labels, null_id)])
    else:
        xin, lab = x, labels
    tt = torch.full((xin.shape[0],), t, dtype=torch.long)
    main, head = model(xin, tt, lab)
    eps = head + ig_scale * (main - head) if ig_scale != 1.0 else main
    if use_cfg:
        e_cond, e_null = eps.chunk(2)
        eps = e_null + cfg_scale * (e_cond - e_null)
    return eps


@torch.no_grad()
def ddim_sample(
    model: InternalGuidanceUNet,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor,
    null_id: int,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    ig_scale: float = 1.0,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021 eq. 12) from `noise` to clean latents.

    eta = 0: deterministic ODE sampler; eta = 1: ancestral (DDPM-like) steps, whose fresh noise comes
    from one generator per sample (`generators`), so results do not depend on the batch size.
    """
    ts = ddim_timesteps(len(alphas_cumprod), num_steps)
    x = noise
    for k, t in enumerate(ts):
        eps = guided_epsilon(model, x, t, labels, null_id, cfg_scale, ig_scale)
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # Tweedie estimate of the clean latent
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()  # eq. 16
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0 and k + 1 < len(ts):
            if generators is None:
                raise ValueError("eta > 0 needs one generator per sample")
            z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
            x = x + sigma * z
    return x


@dataclass
class SampleRun:
    images: torch.Tensor  # [n, C, H, W] in [-1, 1]
    labels: torch.Tensor  # requested labels (null id for unconditional)
    sampling_seconds: float  # denoiser loop only
    decode_seconds: float


def generate(
    prior: Any,
    labels: torch.Tensor,
    seed: int,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    ig_scale: float = 1.0,
    batch_size: int = 250,
    progress: Callable[[int], None] | None = None,
    eta: float = 0.0,
) -> SampleRun:
    """Sample len(labels) images from a `ShippedPrior`-like object (vae, unet, scheduler, info)."""
    shape = tuple(prior.info["latent_shape"])
    null_id = int(prior.info["null_class_id"])
    ac = prior.scheduler.alphas_cumprod.to(torch.float32)
    idx = torch.arange(len(labels))
    samp = dec = 0.0
    images = []
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        noise = noise_for_indices(idx[sl], shape, seed)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + int(i) + 7_919) for i in idx[sl].tolist()]
        t0 = time.perf_counter()
        z = ddim_sample(prior.unet, ac, noise, labels[sl], null_id, num_steps, cfg_scale, ig_scale, eta, gens)
        t1 = time.perf_counter()
        images.append(prior.decode(z))
        dec += time.perf_counter() - t1
        samp += t1 - t0
        if progress is not None:
            progress(len(noise))
    return SampleRun(torch.cat(images), labels, samp, dec)


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    probs, feats = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        f = classifier.features(x)
        feats.append(f.double())
        probs.append(torch.softmax(classifier.fc(f), dim=1))
    return {"probs": torch.cat(probs), "features": torch.cat(feats)}


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), float64, scipy.linalg.sqrtm."""
    from scipy import linalg

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # regularise near-singular products (as pytorch-fid does)
        eps = 1e-6 * np.eye(len(s_a))
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


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
