"""The denoiser contract: the only thing the sampling loop knows about a model.

Every model family gets one adapter that turns it into a `Denoiser`: given the noisy latent x_t
(in the scheduler's *model input* space, i.e. after `scheduler.scale_model_input`), the timestep t
and a batch of conditions, return the model output in its own parameterisation (epsilon, v or
sample) and, when the model has one, the output of its Internal-Guidance head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class DenoiserOutput:
    """Model output for a batch. `intermediate` is the Internal-Guidance head's output, if any."""

    sample: torch.Tensor
    intermediate: torch.Tensor | None = None


@runtime_checkable
class Denoiser(Protocol):
    """x_t, t, condition -> model output (+ intermediate output)."""

    #: "epsilon", "v_prediction" or "sample", as in diffusers scheduler configs.
    prediction_type: str
    #: shape of one latent, (C, H, W).
    latent_shape: tuple[int, int, int]
    #: True when `null_condition` is meaningful (classifier-free guidance is possible).
    supports_cfg: bool
    #: True when `DenoiserOutput.intermediate` is filled (Internal Guidance is possible).
    supports_internal_guidance: bool

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput: ...

    def null_condition(self, batch_size: int) -> Any:
        """The unconditional condition for a batch (null class, empty prompt)."""
        ...
