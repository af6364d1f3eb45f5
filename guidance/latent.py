"""`latent` method: the MMD² gradient on the Tweedie estimate x̂0, no backprop through the denoiser.

g = ∇_{x̂0} MMD²(x̂0(X_t), Y); x̂0 ← x̂0 − Δ(g); the sampler then recomposes x_{t−1} from the moved x̂0
and the unchanged predicted noise. Clean-to-clean: x̂0 is compared with clean reference latents.
Cost: two kernel blocks, O(B·(B+M)·d) per step, no extra network call.
"""

from __future__ import annotations

from .method import GuidanceMethod, GuidanceStep, X0Correction
from .schedules import closed_form_step

#: (Δ to subtract from x̂0, MMD² of the batch before the move): the closed-form step, applied to x̂0.
latent_guidance_delta = closed_form_step


class LatentGuidance(GuidanceMethod):
    """x̂0 ← x̂0 − Δ(∇_{x̂0} MMD²(x̂0, Y))  (DESIGN.md §2, `latent`): one denoiser call, no backprop."""

    name = "latent"

    def correct_x0(self, step: GuidanceStep) -> X0Correction:
        return X0Correction(
            *latent_guidance_delta(
                step.x0, step.target, step.strength, **step.mmd_options, attraction_floor=step.attraction_floor
            )
        )
