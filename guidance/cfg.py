"""Classifier-free guidance (Ho & Salimans 2022): a model-output combiner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import OutputGuidance, extrapolate


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε = ε_∅ + w (ε_c − ε_∅)  (Ho & Salimans 2022, eq. 6). w = 1 is the plain conditional model."""
    return extrapolate(uncond, cond, scale)


@dataclass(frozen=True)
class ClassifierFreeGuidance(OutputGuidance):
    """ε = ε_∅ + w (ε_c − ε_∅): weak = the null-condition output, strong = the conditional one.

    The null half is batched with the conditional one, so each sample costs two network rows.
    """

    calls: ClassVar[int] = 2
