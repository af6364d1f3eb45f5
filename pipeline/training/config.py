"""The training configuration of the shipped prior and its presets.

`cpu` is the shipped prior's recipe: a small UNet that sees 1M training samples in well under 100 minutes on
an idle 2-core CPU; `full` is a larger recipe for a GPU (`--preset auto`, the default, picks `full` on CUDA
and `cpu` otherwise); `smoke` runs a few steps of every stage (the test suite).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Stage order: the classifier trains before the UNet so the UNet stage can log a learning curve.
STAGES = ("vae", "classifier", "latents", "unet", "eval")


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist"
    model_id: str = "mmd-augment/mnist-ldm-v3"
    seed: int = 0
    heldout_fraction: float = 0.2  # mnist: 100 per class (prior_data.mnist_split)
    image_size: int = 32
    channels: int = 1
    smoke_images: int = 0  # >0: train on a stratified subset of this many images
    # nuisance augmentation (pipeline/training/augment.py), shared by every stage
    plain_fraction: float = 0.4
    aug_p_each: float = 0.35
    # VAE: AutoencoderKL 32/64/64, latent (4, S/4, S/4)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    vae_steps: int = 2000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    latent_views: int = 8  # view 0 is the plain image, the others nuisance-augmented copies
    # UNet: UNet2DModel, attention at the lowest resolution, Internal-Guidance head
    unet_channels: tuple[int, ...] = (96, 192)  # 96/192/192 costs 2.7x the old sampling time on a CPU
    unet_layers_per_block: int = 2
    ig_block: str = "up_blocks.0"
    ig_loss_weight: float = 0.5
    unet_steps: int = 40000
    unet_batch: int = 256
    unet_lr: float = 4e-4
    unet_warmup: int = 500  # linear warm-up steps, then cosine decay over the run's own `unet_steps`
    label_dropout: float = 0.2
    # noise levels: `timestep_sampling` "logsnr" draws (1 - t_uniform_fraction) of the timesteps so that
    # log-SNR(t) ~ N(t_logsnr_mean, t_logsnr_std^2) (where the loss can still be lowered), the rest
    # uniformly (keeps both ends trained); "uniform" is DDPM's t ~ U{0..T-1}
    timestep_sampling: str = "logsnr"
    t_logsnr_mean: float = 0.0
    t_logsnr_std: float = 1.5
    t_uniform_fraction: float = 0.2
    ema_decay: float = 0.9995
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    unet_save_dtype: str = "float16"  # stored weights (loaded back as float32); keeps the folder <= 40 MB
    curve_every: int = 2000  # UNet steps between learning-curve probes (0 = off)
    curve_samples: int = 200  # per probe: half class-conditional, half null class
    # classifier (evaluation judge): trained on the same augmented distribution
    classifier_steps: int = 3000
    classifier_batch: int = 128
    classifier_lr: float = 2e-3
    # evaluation
    eval_samples: int = 1000
    eval_steps: int = 50
    eval_eta: float = 1.0  # the pipeline's default DDIM eta
    eval_cfg_scale: float = 2.0
    eval_ig_scale: float = 1.5
    eval_batch: int = 250

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # about 1.3 s per UNet step with 2 threads on a 2-core CPU: ~1.5 h for every stage
    # the shipped prior: a (64, 128) UNet at ~8 steps/s (batch 64, 2 threads, idle 2-core CPU), 16k steps
    # = 1.02M samples seen; all stages in about an hour
    "cpu": {
        "vae_steps": 700,
        "vae_batch": 32,
        "latent_views": 6,
        "unet_channels": (64, 128),
        "unet_layers_per_block": 1,
        "unet_steps": 16000,
        "unet_batch": 64,
        "unet_lr": 1e-3,
        "unet_warmup": 500,
        "ema_decay": 0.999,
        "label_dropout": 0.3,
        "unet_save_dtype": "float32",
        "curve_every": 2000,
        "classifier_steps": 1500,
    },
    "smoke": {
        "smoke_images": 80,
        "vae_steps": 4,
        "vae_batch": 16,
        "latent_views": 2,
        "unet_channels": (32, 64),
        "unet_layers_per_block": 1,
        "unet_steps": 4,
        "unet_batch": 16,
        "unet_warmup": 2,
        "curve_every": 2,
        "curve_samples": 8,
        "classifier_steps": 4,
        "classifier_batch": 16,
        "eval_samples": 20,
        "eval_steps": 4,
        "eval_batch": 20,
    },
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(TrainConfig(), **{**PRESETS[name], **overrides})


#: The first stage each setting affects (settings not listed affect every stage from the VAE on).
_FIRST_STAGE_PREFIXES = {
    "classifier_": "classifier",
    "latent_views": "latents",
    "unet_": "unet",
    "ig_": "unet",
    "label_dropout": "unet",
    "timestep_sampling": "unet",
    "t_": "unet",
    "ema_decay": "unet",
    "num_train_timesteps": "unet",
    "beta_": "unet",
    "curve_": "unet",
    "eval_": "eval",
    "model_id": "eval",
}


def first_stage_affected(key: str) -> str:
    """The earliest stage whose result depends on setting `key` (a resume may change later stages only)."""
    for prefix, stage in _FIRST_STAGE_PREFIXES.items():
        if key.startswith(prefix):
            return stage
    return STAGES[0]
