"""Conversions between model parameterisations, for any x_t = α_t x0 + σ_t ε.

Variance-preserving (VP) models have α_t² + σ_t² = 1 (DDPM/DDIM, Ho et al. 2020 eq. 4) and predict ε,
v = α_t ε − σ_t x0 (Salimans & Ho 2022, eq. 7) or x0 directly ("sample"). Rectified-flow models (SD3, Flux,
Sana) have α_t = 1 − σ_t and predict the velocity v = ε − x0 ("flow_prediction", Esser et al. 2024 eq. 2-3).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def to_x0_eps(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a model output; x̂0 is the Tweedie estimate E[x0 | x_t]."""
    _check(prediction_type)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sigma * eps) / alpha  # x0 = (x_t − σ ε)/α
    elif prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * model_output  # x0 = α x_t − σ v
        eps = sigma * x_t + alpha * model_output  # ε = σ x_t + α v
    elif prediction_type == "flow_prediction":
        # x_t − σ v = (α + σ) x0 and x_t + α v = (α + σ) ε for v = ε − x0; α + σ = 1 on the flow schedule
        x0 = (x_t - sigma * model_output) / (alpha + sigma)
        eps = (x_t + alpha * model_output) / (alpha + sigma)
    else:
        x0 = model_output
        eps = (x_t - alpha * x0) / sigma
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str):
    """The model output that encodes (x0, ε) in `prediction_type`."""
    _check(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow_prediction":
        return eps - x0  # v = ε − x0
    return x0
