"""`lookahead` method: the MMD² gradient w.r.t. x_t through a differentiable k-step sub-solve.

x̂0 comes from a differentiable k-step deterministic DDIM sub-solve from t to 0, and the gradient flows
through all k calls ("Greed is Good", arXiv 2502.08006: posterior guidance is one explicit step of
end-to-end guidance; k = all remaining steps is end-to-end guidance). k = 1 is `posterior`.

The sub-solve is a stateless copy of the DDIM update, never the sampler's own (stateful) scheduler.
"""

from __future__ import annotations

import torch

from .method import AlphaSigmaFn, GuidanceMethod, GuidanceStep, PredictFn
from .posterior import PosteriorGuidance, gradient_guidance_delta  # re-exported: its home was here

__all__ = [
    "AlphaSigmaFn",
    "LookaheadGuidance",
    "PredictFn",
    "ddim_lookahead_x0",
    "gradient_guidance_delta",
    "lookahead_timesteps",
]


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


class LookaheadGuidance(PosteriorGuidance):
    """x̂0 ← x̂0 − Δ(∇_{x_t} MMD²(DDIM_k(x_t → 0), Y))  (DESIGN.md §2, `lookahead`): backprop through k calls.

    `steps` is k; None means all remaining steps (end-to-end guidance). Near the end k is capped by
    the steps left, so a step costs min(k, remaining) denoiser calls.
    """

    name = "lookahead"

    def __init__(self, steps: int | None = 2) -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"lookahead_steps must be >= 1 or None (end-to-end), got {steps}")
        self.steps = steps

    @classmethod
    def create(cls, *, lookahead_steps: int | None = 2) -> GuidanceMethod:
        return cls(lookahead_steps)

    def calls_per_step(self, num_steps: int, remaining: int) -> int:
        k = remaining if self.steps is None else self.steps
        return max(1, min(k, remaining))

    def final_x0(self, step: GuidanceStep) -> torch.Tensor:
        k = self.calls_per_step(step.num_steps, step.remaining)
        return ddim_lookahead_x0(step.x_t, step.t, step.predict, step.alpha_sigma, k, first=(step.x0, step.eps))

    def __repr__(self) -> str:
        return f"LookaheadGuidance(steps={self.steps})"
