"""Classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

import torch


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε = ε_∅ + w (ε_c − ε_∅)  (Ho & Salimans 2022, eq. 6). w = 1 is the plain conditional model."""
    return uncond + scale * (cond - uncond)
