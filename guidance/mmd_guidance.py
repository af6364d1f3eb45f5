"""The MMD guidance settings a sampler carries: target, mode, strength schedule, step rule, memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .mmd import MMDTarget, SampleMemory
from .schedules import StepNormalization, StrengthSchedule

GuidanceMode = Literal["latent", "posterior", "lookahead", "noisy"]
GUIDANCE_MODES: tuple[str, ...] = ("latent", "posterior", "lookahead", "noisy")


@dataclass
class MMDGuidance:
    """Batch MMD guidance toward a reference set.

    mode: `latent` (∇ on x̂0, no backprop), `posterior` (∇ on x_t through one denoiser call),
    `lookahead` (∇ through a k-step DDIM sub-solve; `lookahead_steps=None` means all remaining steps,
    i.e. end-to-end guidance), or `noisy`: the public MMD-Guidance code's scheme, ∇_{x_t} MMD²(x_t, Y)
    of the *noisy* latent against clean references, applied to x_{t−1} after each sampler step (kept
    for comparison; it compares noisy with clean samples, which `latent` avoids).
    `memory` extends the generated set with finished samples (detached).
    """

    target: MMDTarget
    schedule: StrengthSchedule
    mode: GuidanceMode = "latent"
    normalization: StepNormalization = "per_sample"
    lookahead_steps: int | None = 2
    memory: SampleMemory | None = None

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if self.lookahead_steps is not None and self.lookahead_steps < 1:
            raise ValueError(f"lookahead_steps must be >= 1 or None (end-to-end), got {self.lookahead_steps}")

    @property
    def needs_denoiser_gradient(self) -> bool:
        return self.mode in ("posterior", "lookahead")

    def substeps(self, remaining_steps: int) -> int:
        """Number of denoiser calls in the differentiable sub-solve at a step with `remaining_steps` left."""
        if self.mode == "posterior":
            return 1
        k = remaining_steps if self.lookahead_steps is None else self.lookahead_steps
        return max(1, min(k, remaining_steps))
