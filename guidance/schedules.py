"""Guidance strength over the trajectory, and how a gradient becomes a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

ScheduleKind = Literal["constant", "interval", "linear_decay", "linear_ramp"]
StepNormalization = Literal["per_sample", "batch", "raw"]


@dataclass(frozen=True)
class StrengthSchedule:
    """s_t as a function of trajectory progress p = step / num_steps ∈ [0, 1) (0 = pure noise).

    - constant: s everywhere;
    - interval: s for p in [start, end), 0 elsewhere (guide only part of the trajectory);
    - linear_decay: s·(1 − p) (strong early, off at the end);
    - linear_ramp: s·p (off early, strong at the end).
    """

    strength: float
    kind: ScheduleKind = "constant"
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"schedule interval must satisfy 0 <= start <= end <= 1, got [{self.start}, {self.end})")

    def __call__(self, progress: float) -> float:
        if not self.start <= progress < self.end and not (self.end == 1.0 and progress >= 1.0):
            return 0.0
        if self.kind in ("constant", "interval"):
            return self.strength
        if self.kind == "linear_decay":
            return self.strength * (1.0 - progress)
        if self.kind == "linear_ramp":
            return self.strength * progress
        raise ValueError(f"unknown schedule kind {self.kind!r}")


def guidance_step(
    grad: torch.Tensor, x: torch.Tensor, strength: float, normalization: StepNormalization = "per_sample"
) -> torch.Tensor:
    """Turn ∇MMD² (shape [n, ...]) into the step Δ subtracted from x (same shape).

    - per_sample: ‖Δ_i‖ = s‖x_i‖, direction −∇ (a relative step, as the public MMD-Guidance code);
    - batch: Δ_i = s · g_i · mean‖x‖ / mean‖g‖ (relative step for the batch, keeps per-sample ratios:
      samples that pull the set further from the references move further);
    - raw: Δ = s · g.
    """
    if strength == 0.0:
        return torch.zeros_like(x)
    g = grad.flatten(1).float()
    xf = x.flatten(1).float()
    eps = 1e-30  # a zero gradient (e.g. far outside every kernel's reach) gives a zero step, never NaN
    if normalization == "raw":
        step = strength * g
    elif normalization == "per_sample":
        step = strength * xf.norm(dim=1, keepdim=True) * (g / g.norm(dim=1, keepdim=True).clamp_min(eps))
    elif normalization == "batch":
        step = strength * xf.norm(dim=1).mean() * (g / g.norm(dim=1).mean().clamp_min(eps))
    else:
        raise ValueError(f"normalization must be 'per_sample', 'batch' or 'raw', got {normalization!r}")
    return step.reshape(x.shape).to(x.dtype)


def attraction_bounded_step(
    grad: torch.Tensor,
    attraction: torch.Tensor,
    x: torch.Tensor,
    strength: float,
    normalization: StepNormalization = "per_sample",
    min_ratio: float = 0.1,
) -> torch.Tensor:
    """`guidance_step` with the step of a sample that has (almost) no attraction left scaled down.

    ∇_i MMD² = r_i + a_i: the batch repulsion r_i and the attraction a_i toward the references (the
    cross term, `MMDTarget.grad_terms`). Far from every reference a_i vanishes (an RBF kernel's reach
    does, exponentially) while r_i does not, and a normalised step then pushes a runaway sample a full
    step further away every step: the grey-texture "garbage" of guided runs. Here

        Δ_i = w_i · guidance_step(∇)_i,  w_i = min(1, ‖a_i‖ / (min_ratio · ‖r_i‖)),

    so a sample whose attraction is at least `min_ratio` of its repulsion moves exactly as before (inside
    the support both are of the same order, and repulsion must still spread a too-tight batch), and one
    without attraction does not move: it follows the prior, which stays on the data manifold.
    """
    if not min_ratio > 0:
        raise ValueError(f"min_ratio must be > 0, got {min_ratio}")
    step = guidance_step(grad, x, strength, normalization)
    if strength == 0.0:
        return step
    a = attraction.flatten(1).float().norm(dim=1)
    r = (grad.flatten(1).float() - attraction.flatten(1).float()).norm(dim=1)
    w = (a / (min_ratio * r).clamp_min(1e-30)).clamp(max=1.0)
    return (step.flatten(1) * w.unsqueeze(1)).reshape(x.shape).to(step.dtype)


def closed_form_step(
    x: torch.Tensor,
    target: Any,
    strength: float,
    *,
    x_cond: torch.Tensor | None = None,
    normalization: StepNormalization = "per_sample",
    memory: Any = None,
    attraction_floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ(∇_x MMD²(x, Y)), MMD²(x, Y)): the step of the closed-form methods (`latent` on x̂0, `noisy` on x_t).

    `attraction_floor` = None: Δ = `guidance_step(∇)`; a number: `attraction_bounded_step` with that
    `min_ratio`, so a sample the references no longer attract is not pushed further out.
    """
    if attraction_floor is None:
        grad, value = target.grad(x.detach(), x_cond=x_cond, memory=memory)
        return guidance_step(grad, x, strength, normalization), value
    grad, attraction, value = target.grad_terms(x.detach(), x_cond=x_cond, memory=memory)
    return attraction_bounded_step(grad, attraction, x, strength, normalization, attraction_floor), value
