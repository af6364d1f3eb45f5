"""`posterior` and `lookahead` modes: the MMD² gradient w.r.t. x_t through the denoiser.

`posterior` (greedy): g = ∇_{x_t} MMD²(x̂0(x_t), Y), one denoiser call with backprop.
`lookahead` k: x̂0 comes from a differentiable k-step deterministic DDIM sub-solve from t to 0, and the
gradient flows through all k calls ("Greed is Good", arXiv 2502.08006: posterior guidance is one explicit
step of end-to-end guidance; k = all remaining steps is end-to-end guidance). k = 1 is `posterior`.

The sub-solve is a stateless copy of the DDIM update, never the sampler's own (stateful) scheduler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .mmd import MMDTarget, SampleMemory
from .schedules import StepNormalization, guidance_step

#: (x_t in VP space, t) -> (x̂0, ε̂): the (CFG/IG-combined) model as a differentiable function.
PredictFn = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
#: t -> (α_t, σ_t) of the VP forward process x_t = α_t x0 + σ_t ε.
AlphaSigmaFn = Callable[[float], tuple[float, float]]


def lookahead_timesteps(t: float, k: int) -> list[float]:
    """k evenly spaced sub-solve times t = τ_0 > τ_1 > … > τ_{k−1} > 0 (the last update lands on x0)."""
    if k < 1:
        raise ValueError(f"lookahead steps k must be >= 1, got {k}")
    return [t * (1.0 - j / k) for j in range(k)]


def ddim_lookahead_x0(
    x_t: torch.Tensor,
    t: float,
    predict: PredictFn,
    alpha_sigma: AlphaSigmaFn,
    k: int,
    first: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x̂0 from k deterministic DDIM steps t → 0, differentiable w.r.t. x_t.

    DDIM (Song et al. 2021, eq. 12 with η = 0): x_{τ'} = α_{τ'} x̂0(x_τ) + σ_{τ'} ε̂(x_τ).
    `first` is the (x̂0, ε̂) already computed at (x_t, t) with gradients enabled (saves one call).
    """
    times = lookahead_timesteps(t, k)
    x = x_t
    for j, tau in enumerate(times):
        x0, eps = first if (j == 0 and first is not None) else predict(x, tau)
        if j == k - 1:
            return x0
        alpha_next, sigma_next = alpha_sigma(times[j + 1])
        x = alpha_next * x0 + sigma_next * eps
    raise AssertionError("unreachable")


def gradient_guidance_delta(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    target: MMDTarget,
    strength: float,
    *,
    x_cond: torch.Tensor | None = None,
    normalization: StepNormalization = "per_sample",
    memory: SampleMemory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ in x̂0 units, MMD² before the move), with g = ∇_{x_t} MMD²(x̂0(x_t)) by the chain rule.

    `x0_hat` must be a differentiable function of `x_t` (x_t.requires_grad). The closed-form
    ∂MMD²/∂x̂0 is back-propagated through the denoiser: g = (∂x̂0/∂x_t)ᵀ ∇_{x̂0} MMD².
    Like `latent` mode, the step is expressed on x̂0 (its length relative to ‖x̂0‖ for `per_sample`);
    the sampler applies it as x_t ← x_t − α_t Δ, which for `raw` is ≈ s·∇_{x̂0} since ∂x̂0/∂x_t ≈ I/α_t.
    """
    grad_x0, value = target.grad(x0_hat.detach(), x_cond=x_cond, memory=memory)
    (grad_xt,) = torch.autograd.grad(x0_hat, x_t, grad_outputs=grad_x0.to(x0_hat.dtype))
    return guidance_step(grad_xt, x0_hat.detach(), strength, normalization), value
