"""An analytic test bed: a Gaussian-mixture data distribution with an exact denoiser.

Data x0 ~ Σ_k π_k N(μ_k, s² I). Under x_t = α_t x0 + σ_t ε the marginal is
p_t = Σ_k π_k N(α_t μ_k, (α_t² s² + σ_t²) I), so the score and the ε-prediction are closed-form:
ε̂(x_t) = −σ_t ∇log p_t(x_t) = σ_t Σ_k r_k(x_t) (x_t − α_t μ_k)/(α_t² s² + σ_t²), with r_k the
posterior responsibilities. No training, exact up to float error: guidance math becomes checkable.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler

from .denoiser import DenoiserOutput


class GaussianMixtureDenoiser:
    """Exact ε-prediction for a mixture of isotropic Gaussians; latents have shape (d, 1, 1).

    Conditions (optional) are component indices: a conditional call uses only that component
    (the exact class-conditional model); `null_condition` (-1) is the full mixture.
    """

    prediction_type = "epsilon"
    supports_cfg = True
    supports_internal_guidance = False

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor, alphas_cumprod: torch.Tensor):
        if means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        self.means = means.double()
        self.std = float(std)
        self.weights = (weights / weights.sum()).double()
        self.sigma_ve = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()
        self.latent_shape = (means.shape[1], 1, 1)

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # σ_VE(t) interpolated linearly between integer timesteps (as diffusers' Euler does).
        grid = torch.arange(len(self.sigma_ve), dtype=torch.float64)
        t = t.double().clamp(0, len(grid) - 1)
        lo = t.floor().long().clamp(max=len(grid) - 2)
        frac = t - grid[lo]
        s = self.sigma_ve[lo] * (1 - frac) + self.sigma_ve[lo + 1] * frac
        alpha = 1.0 / (1.0 + s * s).sqrt()
        return alpha, s * alpha

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        batch = x_t.shape[0]
        x = x_t.reshape(batch, -1).double()
        alpha, sigma = self._alpha_sigma(torch.as_tensor(t).reshape(-1).expand(batch))
        alpha, sigma = alpha[:, None], sigma[:, None]
        var = alpha**2 * self.std**2 + sigma**2  # [B, 1]
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None]  # [B, K, d]
        logits = -0.5 * (diff**2).sum(-1) / var + self.weights.log()[None]
        if condition is not None:
            cond = torch.as_tensor(condition, device=x.device).reshape(-1)
            mask = (cond[:, None] == torch.arange(len(self.means))[None]) | (cond[:, None] < 0)
            logits = logits.masked_fill(~mask, float("-inf"))
        resp = logits.softmax(dim=1)  # r_k(x_t)
        eps = sigma * (resp[:, :, None] * diff).sum(1) / var
        return DenoiserOutput(sample=eps.to(x_t.dtype).reshape(x_t.shape))

    def null_condition(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), -1, dtype=torch.long)

    def sample_data(self, n: int, generator: torch.Generator, weights: torch.Tensor | None = None):
        """(x0 [n, d, 1, 1], component labels [n]) drawn from the mixture (optionally reweighted)."""
        w = self.weights if weights is None else (weights / weights.sum()).double()
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.std * noise
        return x.float().reshape(n, *self.latent_shape), comp

    def nearest_component(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the closest mixture mean for each sample."""
        d = torch.cdist(x.reshape(x.shape[0], -1).double(), self.means)
        return d.argmin(dim=1)


def square_mixture(
    spacing: float = 4.0, std: float = 0.5, num_train_timesteps: int = 1000
) -> tuple[GaussianMixtureDenoiser, DDIMScheduler]:
    """Four equally weighted 2-D modes at the corners of a square, with a DDIM scheduler."""
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )
    h = spacing / 2
    means = torch.tensor([[-h, -h], [-h, h], [h, -h], [h, h]])
    denoiser = GaussianMixtureDenoiser(means, std, torch.ones(4), scheduler.alphas_cumprod)
    return denoiser, scheduler


class FlowGaussianMixtureDenoiser(GaussianMixtureDenoiser):
    """The same mixture under rectified flow: x_t = (1 − σ) x0 + σ ε with σ = t / num_train_timesteps, the
    exact velocity v̂ = E[ε − x0 | x_t] = ε̂ − x̂0, where ε̂ is the mixture's closed form above with α = 1 − σ
    and x̂0 = (x_t − σ ε̂)/α (SD3/Flux's parameterisation, Esser et al. 2024 eq. 2-3)."""

    prediction_type = "flow_prediction"

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor, num_train_timesteps: int = 1000):
        super().__init__(means, std, weights, torch.full((2,), 0.5))
        self.num_train_timesteps = num_train_timesteps

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = (t.double() / self.num_train_timesteps).clamp(0.0, 1.0)
        return 1.0 - sigma, sigma

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        batch = x_t.shape[0]
        eps = super().__call__(x_t, t, condition).sample.reshape(batch, -1).double()
        alpha, sigma = self._alpha_sigma(torch.as_tensor(t).reshape(-1).expand(batch))
        alpha, sigma = alpha[:, None], sigma[:, None]
        x = x_t.reshape(batch, -1).double()
        # x̂0 = (x_t − σ ε̂)/α; at σ = 1 (α = 0) it is the mixture mean, the limit of the same formula
        mean = (self.weights[:, None] * self.means).sum(0)[None]
        x0 = torch.where(alpha > 1e-12, (x - sigma * eps) / alpha.clamp_min(1e-12), mean)
        return DenoiserOutput(sample=(eps - x0).to(x_t.dtype).reshape(x_t.shape))


def square_flow_mixture(spacing: float = 4.0, std: float = 0.5, shift: float = 1.0):
    """`square_mixture`'s four modes under rectified flow, with a FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    h = spacing / 2
    means = torch.tensor([[-h, -h], [-h, h], [h, -h], [h, h]])
    return FlowGaussianMixtureDenoiser(means, std, torch.ones(4)), FlowMatchEulerDiscreteScheduler(shift=shift)
