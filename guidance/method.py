"""The contract every guidance method keeps, so the sampling loop never asks which method it runs.

Two kinds, as in diffusers' guiders and k-diffusion's samplers:

- A `GuidanceMethod` steers the trajectory toward the references. At each step the loop hands it a
  `GuidanceStep` (the VP-form model input x_t = α_t x0 + σ_t ε, the model's x̂0/ε̂, the step's strength,
  the MMD target, and a `predict` callable for methods that call the denoiser again) and the method
  answers at one or both of two places: `correct_x0`, before the scheduler step, returns Δ to subtract
  from x̂0 (the loop recomposes x_t' = α(x̂0 − Δ) + σ ε̂); `correct_prev`, after the scheduler step,
  returns a moved x_{t−1}. Each answer carries the batch's MMD² for the trace. A method also declares
  whether it needs the denoiser's gradient and how many denoiser calls a step costs it.
- An `OutputGuidance` combines two model outputs into one: out = weak + w (strong − weak), w = 1 being
  the plain model (classifier-free guidance: weak = unconditional; Internal Guidance: weak = the
  intermediate head).

Methods are looked up by name in `guidance.registry`. Pure tensor code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, TypedDict

import torch

from .mmd import MMDTarget, SampleMemory
from .schedules import StepNormalization

#: (x_t in VP space, t) -> (x̂0, ε̂): the (CFG/IG-combined) model as a differentiable function.
PredictFn = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
#: t -> (α_t, σ_t) of the VP forward process x_t = α_t x0 + σ_t ε.
AlphaSigmaFn = Callable[[float], tuple[float, float]]

#: A backward pass through the denoiser costs about two forward passes (so one guided call ≈ 3).
BACKWARD_COST = 2.0


class MMDOptions(TypedDict):
    """The keyword options every MMD step function takes (`latent_guidance_delta`, `noisy_guidance_update`, …)."""

    x_cond: torch.Tensor | None
    normalization: StepNormalization
    memory: SampleMemory | None


@dataclass(frozen=True)
class GuidanceStep:
    """One sampler step as a guidance method sees it (float32 tensors, VP parameterisation).

    `x_t` requires grad, and `x0`/`eps` are differentiable functions of it, exactly when the method
    declares `needs_denoiser_gradient`. `predict` re-evaluates the (CFG/IG-combined) model at another
    (x, τ); the loop counts those calls. `t` and τ are training-schedule timesteps (0 = clean end).
    """

    x_t: torch.Tensor
    t: float
    alpha: float
    sigma: float
    x0: torch.Tensor
    eps: torch.Tensor
    step_index: int
    num_steps: int
    #: s_t, the schedule's strength at this step (> 0: the loop skips guidance when it is 0).
    strength: float
    target: MMDTarget
    normalization: StepNormalization
    memory: SampleMemory | None
    #: the product kernel's condition of each sample (class labels), or None.
    x_cond: torch.Tensor | None
    predict: PredictFn
    alpha_sigma: AlphaSigmaFn
    #: closed-form methods: bound the step of samples the references no longer attract (None = off).
    attraction_floor: float | None = None

    @property
    def progress(self) -> float:
        """p = step / num_steps ∈ [0, 1), 0 = pure noise (the schedules' argument)."""
        return self.step_index / self.num_steps

    @property
    def remaining(self) -> int:
        """Steps left, this one included."""
        return self.num_steps - self.step_index

    @property
    def mmd_options(self) -> MMDOptions:
        """x_cond, normalization and memory, as keywords for the methods' step functions."""
        return MMDOptions(x_cond=self.x_cond, normalization=self.normalization, memory=self.memory)


class X0Correction(NamedTuple):
    """Before the scheduler step: x̂0 ← x̂0 − `delta`; `mmd2` of the batch before the move."""

    delta: torch.Tensor
    mmd2: torch.Tensor


class PrevCorrection(NamedTuple):
    """After the scheduler step: x_{t−1} ← `x_prev`; `mmd2` of the batch before the move."""

    x_prev: torch.Tensor
    mmd2: torch.Tensor


class GuidanceMethod:
    """Base of the MMD guidance methods: override `correct_x0` and/or `correct_prev`.

    `correct_x0` runs with gradients enabled iff `needs_denoiser_gradient`; `correct_prev` runs under
    `torch.no_grad`. Both are called only at steps whose strength is > 0.
    """

    #: the registry name, also `AugmentConfig.guidance`'s value.
    name: ClassVar[str]
    #: True when `correct_x0` back-propagates through the denoiser (x_t must require grad).
    needs_denoiser_gradient: ClassVar[bool] = False

    @classmethod
    def create(cls, *, lookahead_steps: int | None = 2) -> GuidanceMethod:
        """The method from the job-level options; a method ignores the options it has no use for."""
        return cls()

    def calls_per_step(self, num_steps: int, remaining: int) -> int:
        """Denoiser forward calls at a step with `remaining` of `num_steps` steps left (1 = no extra)."""
        return 1

    def correct_x0(self, step: GuidanceStep) -> X0Correction | None:
        """Δ to subtract from x̂0 before the scheduler step (None: no correction here)."""
        return None

    def correct_prev(self, x_prev: torch.Tensor, step: GuidanceStep) -> PrevCorrection | None:
        """The moved x_{t−1} (in the scheduler's own space) after the scheduler step (None: unchanged)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def denoiser_cost(method: GuidanceMethod | None, num_steps: int) -> float:
    """Mean denoiser cost per step relative to an unguided step: calls × (1 + backward if any).

    E.g. `latent` 1, `posterior` 3, `lookahead` k=2 over 6 steps 3·11/6 (the last step has one call).
    Kernel and MMD work (O(B·(B+M)·d), DESIGN.md §2) is not counted.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if method is None:
        return 1.0
    per_call = 1.0 + (BACKWARD_COST if method.needs_denoiser_gradient else 0.0)
    calls = sum(method.calls_per_step(num_steps, num_steps - i) for i in range(num_steps))
    return per_call * calls / num_steps


def extrapolate(weak: torch.Tensor, strong: torch.Tensor, scale: float) -> torch.Tensor:
    """weak + w (strong − weak): w = 1 gives `strong`, w = 0 gives `weak`, w > 1 pushes past `strong`."""
    return weak + scale * (strong - weak)


def in_interval(progress: float, interval: tuple[float, float] | None) -> bool:
    """Whether trajectory progress p ∈ [0, 1) (0 = pure noise) lies in [lo, hi); None = everywhere."""
    if interval is None:
        return True
    lo, hi = interval
    return lo <= progress < hi


@dataclass(frozen=True)
class OutputGuidance:
    """A model-output combiner out = weak + w (strong − weak), active inside `interval` of progress.

    `calls` is the network rows per sample it needs when active (relative to the plain model).
    """

    scale: float = 1.0
    #: [lo, hi) of trajectory progress p ∈ [0, 1) (0 = pure noise) where w applies; None = everywhere.
    interval: tuple[float, float] | None = None

    calls: ClassVar[int] = 1

    def scale_at(self, progress: float) -> float:
        """w at trajectory progress p: `scale` inside the interval, 1 (the plain model) outside."""
        return self.scale if in_interval(progress, self.interval) else 1.0

    @property
    def enabled(self) -> bool:
        """False when w = 1: the combiner is the identity and needs nothing from the model."""
        return self.scale != 1.0

    def combine(self, weak: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
        return extrapolate(weak, strong, self.scale)
