"""Internal Guidance (arXiv 2512.24176): a model-output combiner, from an intermediate head to the final output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import OutputGuidance, extrapolate, in_interval


def ig_combine(intermediate: torch.Tensor, final: torch.Tensor, scale: float) -> torch.Tensor:
    """out = out_l + w (out_L − out_l)  (IG, eq. 5); w = 1 is the plain model."""
    return extrapolate(intermediate, final, scale)


def ig_active(progress: float, interval: tuple[float, float] | None) -> bool:
    """Whether IG applies at trajectory progress p ∈ [0, 1) (0 = pure noise). None = everywhere.

    The paper's best small-model setting applies IG at high/mid noise only, e.g. interval (0.0, 0.6).
    """
    return in_interval(progress, interval)


@dataclass(frozen=True)
class InternalGuidance(OutputGuidance):
    """out = out_l + w (out_L − out_l): weak = the intermediate head l, strong = the final output L.

    The head rides along the same forward pass: no extra network call. `interval` limits it to part
    of the trajectory (the paper's best small-model setting: high/mid noise, e.g. (0.0, 0.6)).
    """

    calls: ClassVar[int] = 1
