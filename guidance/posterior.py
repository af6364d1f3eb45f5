"""`posterior` method (greedy): the MMD² gradient w.r.t. x_t through one denoiser call.

g = ∇_{x_t} MMD²(x̂0(x_t), Y) = (∂x̂0/∂x_t)ᵀ ∇_{x̂0} MMD²: the closed-form gradient on x̂0 is
back-propagated through the denoiser (≈ 3× the cost of a step). It is one explicit step of end-to-end
guidance ("Greed is Good", arXiv 2502.08006), and `lookahead` with k = 1.
"""

from __future__ import annotations

import torch

from .method import GuidanceMethod, GuidanceStep, X0Correction
from .mmd import MMDTarget, SampleMemory
from .schedules import StepNormalization, guidance_step


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


class PosteriorGuidance(GuidanceMethod):
    """x̂0 ← x̂0 − Δ(∇_{x_t} MMD²(x̂0(x_t), Y))  (DESIGN.md §2, `posterior`): backprop through one call."""

    name = "posterior"
    needs_denoiser_gradient = True

    def final_x0(self, step: GuidanceStep) -> torch.Tensor:
        """The x̂0 whose MMD² is differentiated w.r.t. x_t: here the model's own Tweedie estimate."""
        return step.x0

    def correct_x0(self, step: GuidanceStep) -> X0Correction:
        x0_hat = self.final_x0(step)
        return X0Correction(*gradient_guidance_delta(step.x_t, x0_hat, step.target, step.strength, **step.mmd_options))
