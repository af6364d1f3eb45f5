"""How a pipeline's latents relate to its VAE, for every family: encode images to latents and decode them back.

Latents = (z − shift) × scaling_factor / std, where z is the VAE posterior's mode: SD 1/2, DiT and the
shipped prior have no shift; SD3 and Flux have a scalar `shift_factor`; some SDXL VAEs carry per-channel
`latents_mean`/`latents_std`. Sana's deep-compression autoencoder (`AutoencoderDC`) returns its latent
directly (no posterior).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LatentEncoding:
    """How the pipeline's latents relate to the VAE posterior z: latents = (z − shift) × scale / std.

    `shift`/`std` are scalars (SD3, Flux: `shift_factor`) or per-channel lists (`latents_mean`/`latents_std`
    of some SDXL VAEs); `packed` is True for pipelines that pack 2×2 latent patches (Flux).
    """

    scaling_factor: float
    shift: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    packed: bool = False

    @property
    def plain(self) -> bool:
        """latents = z × scaling_factor (SD 1/2, DiT, the shipped prior)."""
        return self.shift == 0.0 and self.std == 1.0

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = torch.as_tensor(self.shift, dtype=torch.float32, device=like.device)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=like.device)
        return (
            shift.view(1, -1, 1, 1) if shift.dim() == 1 else shift,
            std.view(1, -1, 1, 1) if std.dim() == 1 else std,
        )

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior mode [B, C, H, W] -> the pipeline's (unpacked) latents, float32."""
        if self.plain:
            return (z * self.scaling_factor).float()
        shift, std = self._stats(z)
        return (z.float() - shift) * self.scaling_factor / std

    def invert(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's latents -> what its VAE decodes (z), in the latents' dtype (as the pipelines' decode)."""
        if self.plain:
            return latents / self.scaling_factor
        shift, std = self._stats(latents)
        return (latents.float() * std / self.scaling_factor + shift).to(latents.dtype)


def latent_encoding(pipe: Any) -> LatentEncoding:
    """The pipeline's latent normalisation, read from its VAE config as its own decode step reads it."""
    return encoding_of_vae(
        pipe.vae,
        packed=callable(getattr(type(pipe), "_pack_latents", None))
        and callable(getattr(type(pipe), "_unpack_latents", None)),
    )


def encoding_of_vae(vae: Any, packed: bool = False) -> LatentEncoding:
    """A VAE's latent normalisation (`scaling_factor`, `shift_factor`, `latents_mean`/`latents_std`)."""
    cfg = vae.config
    scale = float(getattr(cfg, "scaling_factor", None) or 1.0)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # SDXL decode: latents × std / scaling_factor + mean
        return LatentEncoding(scale, tuple(float(v) for v in mean), tuple(float(v) for v in std), packed)
    shift = float(getattr(cfg, "shift_factor", None) or 0.0)  # SD3/Flux decode: latents / scaling + shift
    return LatentEncoding(scale, shift, 1.0, packed)


def posterior_mode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """z of images: the posterior's mode (AutoencoderKL) or the latent itself (Sana's AutoencoderDC)."""
    encoded = vae.encode(images)
    dist = getattr(encoded, "latent_dist", None)
    return dist.mode() if dist is not None else encoded.latent
