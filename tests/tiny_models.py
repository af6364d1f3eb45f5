"""Tiny randomly initialised diffusers models, saved to a folder and loaded back offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from PIL import Image


def tiny_unet(channels: int = 1, size: int = 16, num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )


def tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon")


def save_tiny_ddpm(path: Path, channels: int = 1, size: int = 16) -> Path:
    """Pixel-space DDPM pipeline folder (unet + scheduler)."""
    DDPMPipeline(unet=tiny_unet(channels, size), scheduler=tiny_scheduler()).save_pretrained(path)
    return path


def tiny_vae(channels: int = 1, **config) -> AutoencoderKL:
    """16x16 images -> 4x8x8 latents; `config` overrides (scaling_factor, shift_factor, ...)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        **config,
    )


def save_tiny_dit(path: Path, channels: int = 1, num_classes: int = 4) -> Path:
    """Latent DiT pipeline folder (transformer + AutoencoderKL + scheduler), learned-σ outputs."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=4,
    )
    DiTPipeline(transformer=transformer, vae=tiny_vae(channels), scheduler=tiny_scheduler()).save_pretrained(path)
    return path


def tiny_unet_condition() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def write_reference_folder(
    root: Path, count: int = 24, size: int = 16, classes: tuple[str, ...] | None = None, seed: int = 0
) -> Path:
    """Random-blob grayscale PNGs (optionally in class sub-folders) for end-to-end tests."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = (rng.random((size, size)) * 255).astype(np.uint8)
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(exist_ok=True)
        Image.fromarray(arr, mode="L").save(folder / f"img_{i:03d}.png")
    return root


#: Randomly initialised tiny models draw every sample far from the references (no support to speak of):
#: tests that need kept samples from them widen the filter's support radius.
TINY_SUPPORT_RADIUS = 1e6


def tiny_job_config(tiny: dict, out: Path, **overrides):
    """A fast job config on the tiny DiT (20 kept samples in 3 shards of 8, 4 steps)."""
    from pipeline.config import AugmentConfig

    base = dict(
        ref=tiny["refs"],
        n=20,
        out=str(out),
        model=tiny["dit"],
        shard_size=8,
        batch_size=6,
        steps=4,
        cache_dir=tiny["cache"],
        keep=0.8,
        progress="quiet",
        support_radius=TINY_SUPPORT_RADIUS,
    )
    base.update(overrides)
    return AugmentConfig(**base)


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every shard of a run folder, by name: for byte-identity checks."""
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "shards").glob("*.tar"))}


def short_run_settings(tiny: dict, probe_out: Path, kept: int = 3) -> dict:
    """Settings (for `tiny_job_config`) of a job that finishes short: 8 samples planned in one shard, no
    reserve, and a support radius only the `kept` nearest of them meet (measured on a probe run of the
    same samples, so the job keeps exactly `kept` and falls 8 - kept short)."""
    import json

    import pyarrow.parquet as pq

    from pipeline.jobs.job import run_job

    settings = dict(n=8, shard_size=8, keep=1.0, reserve=0.0, guidance="none")
    run_job(tiny_job_config(tiny, probe_out, **settings))
    bandwidth = json.loads((probe_out / "run.json").read_text())["reference"]["bandwidth"]
    nearest = sorted(pq.read_table(probe_out / "manifest.parquet")["nearest_reference_distance"].to_pylist())
    return {**settings, "support_radius": (nearest[kept - 1] + nearest[kept]) / 2 / bandwidth}
