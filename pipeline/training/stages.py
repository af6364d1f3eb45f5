"""The training stages: VAE, classifier, latent encoding, UNet (+ Internal-Guidance head, EMA)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.models.prior_eval import psnr
from pipeline.models.shipped import DigitClassifier, InternalGuidanceUNet

from .augment import nuisance_augment
from .config import TrainConfig
from .data import Split
from .loop import EMA, TUNER, Checkpointer, batch_indices, detached_state, lr_at, progress_bar, set_lr, step_seed


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


def augment_batch(cfg: TrainConfig, x: torch.Tensor, plain_fraction: float | None = None) -> torch.Tensor:
    """Nuisance augmentation of a training batch, drawn from the global (per-step seeded) generator."""
    frac = cfg.plain_fraction if plain_fraction is None else plain_fraction
    return nuisance_augment(x, torch.default_generator, plain_fraction=frac, p_each=cfg.aug_p_each)[0]


def train_vae(cfg: TrainConfig, split: Split, work: Path, ckpt: Checkpointer, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(step_seed(cfg.seed, "vae", -1))  # initial weights: independent of earlier stages
    vae = make_vae(cfg).to(device)
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
        x = augment_batch(cfg, x).to(device)
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
                "model": detached_state(vae),
                "opt": opt.state_dict(),
                "elapsed": elapsed + time.monotonic() - t0,
            },
        )
    bar.close()
    vae.eval()
    # scaling factor = 1 / std of the training latents (posterior mode), as Stable Diffusion does
    with torch.no_grad():
        z = torch.cat([vae.encode(b.to(device)).latent_dist.mode().cpu() for b in x_train.split(500)])
        x_held = split.data.images[split.heldout]
        rec = torch.cat(
            [vae.decode(vae.encode(b.to(device)).latent_dist.mode()).sample.cpu() for b in x_held.split(500)]
        )
    std, mean = float(z.std()), float(z.mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to("cpu").save_pretrained(work / "final" / "vae", safe_serialization=True)
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


def encode_latents(cfg: TrainConfig, split: Split, work: Path, device: torch.device) -> dict[str, Any]:
    """Training latents [views, n, C, h, w]: view 0 of the plain images, the others of nuisance-augmented
    copies (each with at least one transform), so the UNet sees plain images `plain_fraction` of the time."""
    from diffusers import AutoencoderKL

    t0 = time.monotonic()
    vae = AutoencoderKL.from_pretrained(work / "final" / "vae").eval().to(device)
    sf = float(vae.config.scaling_factor)
    x_train = split.data.images[split.train]
    views = []
    with torch.no_grad():
        for v in tqdm(range(cfg.latent_views), desc="latents", mininterval=20 if not sys.stderr.isatty() else 0.5):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, "latents", v))
            x = x_train if v == 0 else nuisance_augment(x_train, g, plain_fraction=0.0, p_each=cfg.aug_p_each)[0]
            views.append(torch.cat([vae.encode(b.to(device)).latent_dist.mode().cpu() * sf for b in x.split(500)]))
    latents = torch.stack(views).contiguous()  # [views, n_train, C, h, w]
    save_file(
        {"latents": latents, "labels": split.data.labels[split.train].contiguous()},
        work / "latents.safetensors",
    )
    return {"seconds": time.monotonic() - t0, "shape": list(latents.shape), "std": float(latents.std())}


def sample_timesteps(cfg: TrainConfig, alphas_cumprod: torch.Tensor, n: int) -> torch.Tensor:
    """Training timesteps from the global (per-step seeded) generator: uniform, or with log-SNR(t) =
    log(ᾱ_t / (1 - ᾱ_t)) ~ N(mean, std²) mapped to the nearest t (log-SNR falls monotonically in t), mixed
    with a `t_uniform_fraction` of uniform draws. The scheduler, sampler and guidance are unchanged."""
    uniform = torch.randint(0, cfg.num_train_timesteps, (n,))
    if cfg.timestep_sampling == "uniform":
        return uniform
    if cfg.timestep_sampling != "logsnr":
        raise ValueError(f"timestep_sampling must be 'uniform' or 'logsnr', not {cfg.timestep_sampling!r}")
    a = alphas_cumprod.to(torch.float64)
    neg_log_snr = -(a / (1 - a)).log()  # increasing in t: searchsorted needs ascending values
    target = -(cfg.t_logsnr_mean + cfg.t_logsnr_std * torch.randn(n, dtype=torch.float64))
    hi = torch.searchsorted(neg_log_snr, target).clamp(1, len(a) - 1)
    lo = hi - 1
    nearest = torch.where((target - neg_log_snr[lo]).abs() <= (neg_log_snr[hi] - target).abs(), lo, hi)
    return torch.where(torch.rand(n) < cfg.t_uniform_fraction, uniform, nearest)


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
    (seeded per step: latents [views, n, C, H, W], the plain view 0 with probability `plain_fraction`,
    else a random augmented view; `label_dropout` of the labels (default `cfg.label_dropout`) replaced
    by the null class). Returns tensors on `alphas_cumprod`'s device."""
    torch.manual_seed(step_seed(cfg.seed, "unet", step))
    idx = batch_indices(latents.shape[1], cfg.unet_batch, step, cfg.seed, "unet")
    views = latents.shape[0]
    augmented = torch.randint(1, max(views, 2), (len(idx),)).clamp_max(views - 1)
    view = torch.where(torch.rand(len(idx)) < cfg.plain_fraction, torch.zeros_like(augmented), augmented)
    z0 = latents[view, idx]
    y = labels[idx].clone()
    dropout = cfg.label_dropout if label_dropout is None else label_dropout
    y[torch.rand(len(y)) < dropout] = null_id  # null class -> classifier-free guidance
    t = sample_timesteps(cfg, alphas_cumprod.cpu(), len(idx))
    eps = torch.randn_like(z0)
    device = alphas_cumprod.device
    z0, eps, t, y = z0.to(device), eps.to(device), t.to(device), y.to(device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    main, head = model(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, y)
    return F.mse_loss(main, eps), F.mse_loss(head, eps)


def train_unet(cfg: TrainConfig, split: Split, work: Path, ckpt: Checkpointer, device: torch.device) -> dict[str, Any]:
    stored = load_file(work / "latents.safetensors")
    latents, labels = stored["latents"], stored["labels"]
    num_classes = split.data.num_classes
    null_id = num_classes
    torch.manual_seed(step_seed(cfg.seed, "unet", -1))  # initial weights: a resumed run skips earlier stages
    model = build_unet(cfg, num_classes).to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    start, elapsed, curve = 0, 0.0, []
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        ema.shadow = state["ema"]
        opt.load_state_dict(state["opt"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        curve = read_curve(work, start)
    alphas_cumprod = make_scheduler(cfg).alphas_cumprod.to(torch.float32).to(device)
    probe = LearningCurveProbe(cfg, work, num_classes, device) if cfg.curve_every > 0 and num_classes > 0 else None
    t0 = time.monotonic()
    bar = progress_bar(cfg.unet_steps, start, "unet")
    model.train()
    running = None
    for step in range(start, cfg.unet_steps):
        TUNER.begin(step)
        loss_main, loss_head = unet_losses(model, cfg, latents, labels, alphas_cumprod, null_id, step)
        set_lr(opt, lr_at(step, cfg.unet_steps, cfg.unet_lr, min(cfg.unet_warmup, cfg.unet_steps // 10 + 1)))
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
        if probe is not None and ((step + 1) % cfg.curve_every == 0 or step + 1 == cfg.unet_steps):
            point = {"step": step + 1, "loss_main_ema": running, "minutes": (elapsed + time.monotonic() - t0) / 60}
            point.update(probe(ema.shadow))
            curve.append(point)
            append_curve(work, point)
            tqdm.write(f"[unet] learning curve: {json.dumps(point)}")
        ckpt.maybe_save(
            step + 1,
            cfg.unet_steps,
            lambda: {
                "model": detached_state(model),
                "ema": ema.shadow,
                "opt": opt.state_dict(),
                "elapsed": elapsed + time.monotonic() - t0,
            },
        )
    bar.close()
    model.load_state_dict(ema.shadow)  # ship the EMA weights
    model.to("cpu").save_pretrained(work / "final", dtype=getattr(torch, cfg.unet_save_dtype))
    info = {
        "seconds": elapsed + time.monotonic() - t0,
        "steps": cfg.unet_steps,
        "final_main_loss_ema": running,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_per_thread_count": TUNER.pop_counts(),
        "learning_curve": curve,
    }
    tqdm.write(f"[unet] done: {json.dumps({k: v for k, v in info.items() if k != 'learning_curve'})}")
    return info


def build_unet(cfg: TrainConfig, num_classes: int) -> InternalGuidanceUNet:
    """A fresh UNet + Internal-Guidance head of the configured size (latent side = image side / 4)."""
    return InternalGuidanceUNet.build(
        latent_channels=cfg.latent_channels,
        latent_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1),
        num_classes=num_classes,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        head_block=cfg.ig_block,
        loss_weight=cfg.ig_loss_weight,
    )


def read_curve(work: Path, before_step: int) -> list[dict[str, Any]]:
    """Learning-curve points already measured (a resumed run keeps those up to its checkpoint)."""
    path = work / "learning_curve.jsonl"
    if not path.is_file():
        return []
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [p for p in points if p["step"] <= before_step]


def append_curve(work: Path, point: dict[str, Any]) -> None:
    with open(work / "learning_curve.jsonl", "a") as f:
        f.write(json.dumps(point) + "\n")


class LearningCurveProbe:
    """Class accuracy (no CFG) and null-class recognition of the EMA weights, judged by the classifier
    trained in the previous stage: `curve_samples` samples, 25 DDIM steps with the pipeline's sampler."""

    def __init__(self, cfg: TrainConfig, work: Path, num_classes: int, device: torch.device) -> None:
        from diffusers import AutoencoderKL

        self.cfg, self.num_classes, self.device = cfg, num_classes, device
        self.vae = AutoencoderKL.from_pretrained(work / "final" / "vae").eval().to(device)
        self.classifier = DigitClassifier.from_pretrained(work / "final" / "classifier").eval().to(device)
        self.scheduler = make_scheduler(cfg)

    @torch.no_grad()
    def __call__(self, ema_state: dict[str, torch.Tensor]) -> dict[str, Any]:
        from pipeline.models.adapters import InternalGuidanceUNetAdapter
        from pipeline.models.prior_eval import class_summary
        from pipeline.models.sampling import sample_latents
        from pipeline.seeding import sample_seed

        model = build_unet(self.cfg, self.num_classes).to(self.device)
        model.load_state_dict(ema_state)
        model.eval()
        denoiser = InternalGuidanceUNetAdapter(model, null_class=self.num_classes)
        half = max(1, self.cfg.curve_samples // 2)
        out: dict[str, Any] = {}
        for name, labels in (
            ("conditional", torch.arange(half) % self.num_classes),
            ("unconditional", torch.full((half,), self.num_classes)),
        ):
            seeds = [sample_seed(self.cfg.seed + 777, i) for i in range(half)]
            cond = labels.to(self.device)
            run = sample_latents(
                denoiser, self.scheduler, seeds, num_steps=25, condition=cond, eta=1.0, device=self.device
            )
            z = run.latents
            images = self.vae.decode(z / self.vae.config.scaling_factor).sample.clamp(-1, 1)
            probs = torch.softmax(self.classifier(images), 1).cpu()
            summary = class_summary(probs, labels if name == "conditional" else None, self.num_classes)
            if name == "conditional":
                out["class_accuracy"] = summary["class_accuracy"]
            else:
                out["null_confident_fraction"] = summary["confident_fraction"]
                hist = torch.tensor(summary["predicted_histogram"], dtype=torch.float32)
                out["null_largest_class_share"] = float(hist.max() / hist.sum())
        return out


def train_classifier(
    cfg: TrainConfig, split: Split, work: Path, ckpt: Checkpointer, device: torch.device
) -> dict[str, Any]:
    """The evaluation judge, on the same nuisance-augmented distribution as the prior (30% plain)."""
    num_classes = split.data.num_classes
    torch.manual_seed(step_seed(cfg.seed, "classifier", -1))
    clf = DigitClassifier(cfg.channels, num_classes).to(device)
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
        x = augment_batch(cfg, x_train[idx], plain_fraction=0.3).to(device)
        set_lr(opt, lr_at(step, cfg.classifier_steps, cfg.classifier_lr, min(30, cfg.classifier_steps // 10 + 1)))
        loss = F.cross_entropy(clf(x), y_train[idx].to(device))
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
                "model": detached_state(clf),
                "opt": opt.state_dict(),
                "elapsed": elapsed + time.monotonic() - t0,
            },
        )
    bar.close()
    clf.eval()
    with torch.no_grad():
        x_held = split.data.images[split.heldout]
        pred = clf(x_held.to(device)).argmax(1).cpu()
        g = torch.Generator().manual_seed(step_seed(cfg.seed, "classifier", -2))
        x_aug = nuisance_augment(x_held, g, plain_fraction=0.0, p_each=cfg.aug_p_each)[0]
        pred_aug = clf(x_aug.to(device)).argmax(1).cpu()
    y_held = split.data.labels[split.heldout]
    acc = float((pred == y_held).float().mean())
    clf.to("cpu").save_pretrained(work / "final" / "classifier")
    info = {
        "seconds": elapsed + time.monotonic() - t0,
        "steps": cfg.classifier_steps,
        "heldout_accuracy": acc,
        "heldout_augmented_accuracy": float((pred_aug == y_held).float().mean()),
        "steps_per_thread_count": TUNER.pop_counts(),
    }
    tqdm.write(f"[classifier] done: {json.dumps(info)}")
    return info
