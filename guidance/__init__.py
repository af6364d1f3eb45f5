"""Pure tensor code for MMD guidance: kernels, MMD², contributions, gradients, guidance methods.

One file per guidance method (`latent`, `posterior`, `lookahead`, `noisy`; the output combiners `cfg`
and `internal`), all keeping the contract of `guidance.method`; `guidance.registry` names them.
No I/O, no file paths, no orchestration.
"""

from .cfg import ClassifierFreeGuidance, cfg_combine
from .internal import InternalGuidance, ig_active, ig_combine
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
from .latent import LatentGuidance, latent_guidance_delta
from .lookahead import LookaheadGuidance, ddim_lookahead_x0, lookahead_timesteps
from .method import (
    GuidanceMethod,
    GuidanceStep,
    OutputGuidance,
    PrevCorrection,
    X0Correction,
    denoiser_cost,
)
from .mmd import MMDTarget, SampleMemory, mmd2, mmd2_grad, mmd_contributions, nearest_reference_distance
from .mmd_guidance import GUIDANCE_MODES, GuidanceMode, MMDGuidance
from .noisy import NoisyGuidance, noisy_guidance_update
from .parameterization import from_x0_eps, to_x0_eps
from .posterior import PosteriorGuidance, gradient_guidance_delta
from .registry import GUIDANCE_METHODS, make_guidance_method
from .schedules import StepNormalization, StrengthSchedule, attraction_bounded_step, guidance_step

__all__ = [
    "GUIDANCE_METHODS",
    "GUIDANCE_MODES",
    "ClassifierFreeGuidance",
    "CubicPolynomialKernel",
    "DeltaKernel",
    "EmbeddingKernel",
    "GuidanceMethod",
    "GuidanceMode",
    "GuidanceStep",
    "InternalGuidance",
    "InverseMultiquadricKernel",
    "Kernel",
    "LatentGuidance",
    "LookaheadGuidance",
    "MMDGuidance",
    "MMDTarget",
    "MultiBandwidthRBF",
    "NoisyGuidance",
    "OutputGuidance",
    "PosteriorGuidance",
    "PrevCorrection",
    "ProductKernel",
    "RBFKernel",
    "RandomFourierFeatures",
    "SampleMemory",
    "StepNormalization",
    "StrengthSchedule",
    "X0Correction",
    "attraction_bounded_step",
    "cfg_combine",
    "ddim_lookahead_x0",
    "denoiser_cost",
    "from_x0_eps",
    "gradient_guidance_delta",
    "guidance_step",
    "ig_active",
    "ig_combine",
    "latent_guidance_delta",
    "lookahead_timesteps",
    "make_guidance_method",
    "mmd2",
    "mmd2_grad",
    "mmd_contributions",
    "nearest_reference_distance",
    "noisy_guidance_update",
    "to_x0_eps",
]
