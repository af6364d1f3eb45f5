"""Internal Guidance (arXiv 2512.24176): extrapolate from an intermediate head to the final output."""

from __future__ import annotations

import torch


def ig_combine(intermediate: torch.Tensor, final: torch.Tensor, scale: float) -> torch.Tensor:
    """out = out_l + w (out_L − out_l)  (IG, eq. 5); w = 1 is the plain model."""
    return intermediate + scale * (final - intermediate)


def ig_active(progress: float, interval: tuple[float, float] | None) -> bool:
    """Whether IG applies at trajectory progress p ∈ [0, 1) (0 = pure noise). None = everywhere.

    The paper's best small-model setting applies IG at high/mid noise only, e.g. interval (0.0, 0.6).
    """
    if interval is None:
        return True
    lo, hi = interval
    return lo <= progress < hi
