"""The MMD guidance settings a sampler carries: target, method, strength schedule, step rule, memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .method import GuidanceMethod
from .mmd import MMDTarget, SampleMemory
from .registry import GUIDANCE_METHODS, make_guidance_method
from .schedules import StepNormalization, StrengthSchedule

#: The names of `guidance.registry.GUIDANCE_METHODS` as a type (a test keeps the two equal).
GuidanceMode = Literal["latent", "posterior", "lookahead", "noisy"]
GUIDANCE_MODES: tuple[str, ...] = tuple(GUIDANCE_METHODS)


@dataclass
class MMDGuidance:
    """Batch MMD guidance toward a reference set.

    mode: the name of a method in `guidance.registry` — `latent` (∇ on x̂0, no backprop), `posterior`
    (∇ on x_t through one denoiser call), `lookahead` (∇ through a k-step DDIM sub-solve;
    `lookahead_steps=None` means all remaining steps, i.e. end-to-end guidance), or `noisy`: the public
    MMD-Guidance code's scheme, ∇_{x_t} MMD²(x_t, Y) of the *noisy* latent against clean references,
    applied to x_{t−1} after each sampler step (the place a diffusers `callback_on_step_end` offers).
    `memory` extends the generated set with finished samples (detached). `attraction_floor` bounds the
    closed-form methods' step by the attraction term (`guidance.schedules.attraction_bounded_step`).
    """

    target: MMDTarget
    schedule: StrengthSchedule
    mode: GuidanceMode = "latent"
    normalization: StepNormalization = "per_sample"
    lookahead_steps: int | None = 2
    memory: SampleMemory | None = None
    #: `latent`/`noisy`: min attraction/repulsion ratio below which a sample's step shrinks (None = off)
    attraction_floor: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_METHODS:
            raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if self.lookahead_steps is not None and self.lookahead_steps < 1:
            raise ValueError(f"lookahead_steps must be >= 1 or None (end-to-end), got {self.lookahead_steps}")

    @property
    def method(self) -> GuidanceMethod:
        """The `GuidanceMethod` this mode names (built from the current settings)."""
        return make_guidance_method(self.mode, lookahead_steps=self.lookahead_steps)

    @property
    def needs_denoiser_gradient(self) -> bool:
        return self.method.needs_denoiser_gradient
