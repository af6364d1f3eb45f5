"""Pure tensor code for MMD guidance: kernels, MMD², contributions, gradients, guidance methods.

No I/O, no file paths, no orchestration.
"""

from .cfg import cfg_combine
from .internal import ig_active, ig_combine
from .kernels import (
    CubicPolynomialKernel,
    DeltaKernel,
    EmbeddingKernel,
    InverseMultiquadricKernel,
    Kernel,
    MultiBandwidthRBF,
    ProductKernel,
    RandomFourierFeatures,
    RBFKernel,
)
from .latent import latent_guidance_delta
from .lookahead import ddim_lookahead_x0, gradient_guidance_delta, lookahead_timesteps
from .mmd import MMDTarget, SampleMemory, mmd2, mmd2_grad, mmd_contributions, nearest_reference_distance
from .mmd_guidance import GUIDANCE_MODES, GuidanceMode, MMDGuidance
from .parameterization import from_x0_eps, to_x0_eps
from .schedules import StepNormalization, StrengthSchedule, attraction_bounded_step, guidance_step

__all__ = [
    "GUIDANCE_MODES",
    "CubicPolynomialKernel",
    "DeltaKernel",
    "EmbeddingKernel",
    "GuidanceMode",
    "InverseMultiquadricKernel",
    "Kernel",
    "MMDGuidance",
    "MMDTarget",
    "MultiBandwidthRBF",
    "ProductKernel",
    "RBFKernel",
    "RandomFourierFeatures",
    "SampleMemory",
    "StepNormalization",
    "StrengthSchedule",
    "attraction_bounded_step",
    "cfg_combine",
    "ddim_lookahead_x0",
    "from_x0_eps",
    "gradient_guidance_delta",
    "guidance_step",
    "ig_active",
    "ig_combine",
    "latent_guidance_delta",
    "lookahead_timesteps",
    "mmd2",
    "mmd2_grad",
    "mmd_contributions",
    "nearest_reference_distance",
    "to_x0_eps",
]
