"""`noisy` method: the public MMD-Guidance code's scheme, a closed-form step on the noisy latent itself.

g = ∇_{x_t} MMD²(x_t, Y) of the *noisy* latent against clean references (no denoiser call, no backprop),
applied to x_{t−1} after each sampler step: x_{t−1} ← x_{t−1} − Δ(g). That is the place a diffusers
`callback_on_step_end` offers, so `noisy_guidance_update` serves users' own pipelines with the job's math.
"""

from __future__ import annotations

import torch

from .method import GuidanceMethod, GuidanceStep, PrevCorrection
from .mmd import MMDTarget, SampleMemory
from .schedules import StepNormalization, closed_form_step


def noisy_guidance_update(
    x: torch.Tensor,
    target: MMDTarget,
    strength: float,
    normalization: StepNormalization = "per_sample",
    x_cond: torch.Tensor | None = None,
    memory: SampleMemory | None = None,
    attraction_floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − Δ(∇_x MMD²(x, Y)), MMD²(x, Y) before the move): one `noisy` guidance step on latents x.

    `x` is the batch of latents just produced by a scheduler step (x_{t−1}, in the scheduler's own
    space: what a diffusers `callback_on_step_end` receives as `latents`); `strength` is s_t at this
    step and `normalization` turns the gradient into a step (`guidance_step`). `x_cond` are the product
    kernel's conditions of the batch, `memory` finished samples that extend the generated set;
    `attraction_floor` bounds the step of samples the references no longer attract (`closed_form_step`).
    The result keeps x's dtype; gradients are closed-form, nothing is back-propagated.
    """
    with torch.no_grad():
        delta, value = closed_form_step(
            x.float(),
            target,
            strength,
            x_cond=x_cond,
            normalization=normalization,
            memory=memory,
            attraction_floor=attraction_floor,
        )
        return (x - delta).to(x.dtype), value


class NoisyGuidance(GuidanceMethod):
    """x_{t−1} ← x_{t−1} − Δ(∇ MMD²(x_{t−1}, Y))  (DESIGN.md §2, `noisy`): after the step, no extra call."""

    name = "noisy"

    def correct_prev(self, x_prev: torch.Tensor, step: GuidanceStep) -> PrevCorrection:
        return PrevCorrection(
            *noisy_guidance_update(
                x_prev, step.target, step.strength, **step.mmd_options, attraction_floor=step.attraction_floor
            )
        )
