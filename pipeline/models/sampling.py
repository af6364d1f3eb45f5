"""The sampling loop: any diffusers scheduler, per-sample seeds, CFG, Internal Guidance, MMD guidance.

Like k-diffusion's samplers, it is a function of (denoiser, scheduler, initial noise); it knows nothing
about the model beyond the `Denoiser` contract. All guidance math runs in float32 in the parameterisation
x_t = α_t x0 + σ_t ε of the model input (after `scheduler.scale_model_input`): VP (α² + σ² = 1) for DDPM-style
models, α = 1 − σ for rectified-flow models (SD3, Flux, Sana; `guidance.parameterization`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import SchedulerMixin

from guidance.cfg import ClassifierFreeGuidance
from guidance.internal import InternalGuidance
from guidance.method import AlphaSigmaFn, GuidanceStep, PredictFn
from guidance.mmd_guidance import MMDGuidance
from guidance.parameterization import from_x0_eps, to_x0_eps

from ..seeding import noise_generator, step_generator
from .denoiser import Denoiser

#: Called after each step with (step index, number of steps).
ProgressCallback = Callable[[int, int], None]


@dataclass
class SamplingResult:
    """Clean latents [B, C, H, W] (float32) and, for guided runs, MMD² of the batch's x̂0 per step."""

    latents: torch.Tensor
    mmd2_trace: list[float] = field(default_factory=list)
    denoiser_calls: int = 0


def fresh_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A new scheduler with the same config: schedulers are stateful (step index, solver history)."""
    return scheduler.__class__.from_config(scheduler.config)


def is_flow(prediction_type: str) -> bool:
    """Rectified-flow models (SD3, Flux, Sana): x_t = (1 − σ) x0 + σ ε, the model predicts v = ε − x0."""
    return prediction_type == "flow_prediction"


def noise_coefficients(
    scheduler: SchedulerMixin, step_index: int, t: torch.Tensor, prediction_type: str = "epsilon"
) -> tuple[float, float]:
    """(α_t, σ_t) of the model input x_t = α_t x0 + σ_t ε at this step, from the scheduler's own noise levels.

    Flow matching (FlowMatch schedulers, DPM-Solver with flow sigmas): σ = sigmas[i], α = 1 − σ.
    Sigma-based VP schedulers (Euler, DPM-Solver) carry σ_VE per step: α = 1/√(1+σ²), σ_VP = σ α.
    Others (DDIM, DDPM) use ᾱ_t = alphas_cumprod[t]: α = √ᾱ, σ = √(1−ᾱ).
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if is_flow(prediction_type):
        s = float(sigmas[step_index])
        return 1.0 - s, s
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        s = float(sigmas[step_index])
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        return alpha, s * alpha
    abar = float(scheduler.alphas_cumprod[int(round(float(t)))])
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def training_alpha_sigma(scheduler: SchedulerMixin, prediction_type: str = "epsilon") -> AlphaSigmaFn:
    """τ -> (α_τ, σ_τ) on the training schedule (model timesteps; τ = 0 is the clean end).

    VP: ᾱ = alphas_cumprod[round(τ)]. Flow matching: the model's timestep is σ × num_train_timesteps.
    """
    if is_flow(prediction_type):
        scale = float(scheduler.config.num_train_timesteps)

        def flow_alpha_sigma(tau: float) -> tuple[float, float]:
            s = float(tau) / scale
            return 1.0 - s, s

        return flow_alpha_sigma
    abar = scheduler.alphas_cumprod.double()

    def alpha_sigma(tau: float) -> tuple[float, float]:
        a = float(abar[int(round(tau))])
        return math.sqrt(a), math.sqrt(1.0 - a)

    return alpha_sigma


def _scale_model_input(scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's input scaling (Euler's 1/√(σ²+1)); flow-matching schedulers have none."""
    scale = getattr(scheduler, "scale_model_input", None)
    return scale(x, t) if scale is not None else x


def model_output(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor | float,
    condition: Any,
    cfg_scale: float = 1.0,
    ig_scale: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """The guided model output and the number of network evaluations (batch-rows / B) it cost.

    Internal Guidance inside each branch (out = out_l + w(out_L − out_l)), CFG on top
    (ε = ε_∅ + w(ε_c − ε_∅)); CFG batches the conditional and null halves into one call.
    """
    cfg, ig = ClassifierFreeGuidance(cfg_scale), InternalGuidance(ig_scale)
    use_cfg = cfg.enabled and denoiser.supports_cfg and condition is not None
    if ig.enabled and not denoiser.supports_internal_guidance:
        raise ValueError("ig_scale != 1 needs a model with an Internal-Guidance head; this denoiser has none")
    batch = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if use_cfg:
        null = denoiser.null_condition(batch)
        out = denoiser(torch.cat([x, x]), t, _concat_conditions(condition, null))
        main_c, main_u = out.sample.float().chunk(2)
        if ig.enabled:
            inter_c, inter_u = out.intermediate.float().chunk(2)
            main_c, main_u = ig.combine(inter_c, main_c), ig.combine(inter_u, main_u)
        return cfg.combine(main_u, main_c), cfg.calls
    out = denoiser(x, t, condition)
    main = out.sample.float()
    if ig.enabled:
        main = ig.combine(out.intermediate.float(), main)
    return main, ig.calls


def _is_prompt_list(condition: Any) -> bool:
    return isinstance(condition, list | tuple) and len(condition) > 0 and all(isinstance(c, str) for c in condition)


def _concat_conditions(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b.to(a.device)])
    if isinstance(a, dict):  # text conditions: batch-first tensors by name (`pipeline.models.families`)
        return {k: torch.cat([v, b[k].to(v.device)]) for k, v in a.items()}
    return list(a) + list(b)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T for each sample from its own generator: sample i never depends on the batch it is in."""
    noise = [torch.randn(shape, generator=noise_generator(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@dataclass
class _CountingModel:
    """The CFG/IG-combined model on one trajectory, counting its network evaluations."""

    denoiser: Denoiser
    condition: Any
    cfg_scale: float
    alpha_sigma: AlphaSigmaFn
    calls: int = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, ig_scale: float) -> torch.Tensor:
        out, n = model_output(self.denoiser, x, t, self.condition, self.cfg_scale, ig_scale)
        self.calls += n
        return out

    def predictor(self, ig_scale: float) -> PredictFn:
        """(x in VP space, τ) -> (x̂0, ε̂) on the training schedule: a guidance method's extra calls."""

        ptype = self.denoiser.prediction_type
        flow = is_flow(ptype)

        def predict(x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
            a, s = self.alpha_sigma(tau)
            return to_x0_eps(self(x, float(tau) if flow else round(tau), ig_scale), x, a, s, ptype)

        return predict


def _step_kwargs(scheduler: SchedulerMixin, seeds: Sequence[int], eta: float) -> dict[str, Any]:
    """Per-sample generators (stochastic schedulers) and η (DDIM), where the scheduler's `step` takes them."""
    step_kwargs: dict[str, Any] = {}
    step_params = inspect.signature(scheduler.step).parameters
    if "generator" in step_params:
        step_kwargs["generator"] = [step_generator(int(s)) for s in seeds]
    if "eta" in step_params:
        step_kwargs["eta"] = eta
    return step_kwargs


def sample_latents(
    denoiser: Denoiser,
    scheduler: SchedulerMixin,
    seeds: Sequence[int],
    *,
    num_steps: int = 50,
    condition: Any = None,
    cfg_scale: float = 1.0,
    ig_scale: float = 1.0,
    ig_interval: tuple[float, float] | None = None,
    guidance: MMDGuidance | None = None,
    mmd_condition: torch.Tensor | None = None,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    callback: ProgressCallback | None = None,
) -> SamplingResult:
    """Sample one batch of clean latents, one per seed.

    `condition` is what the model sees (class labels, prompt embeddings, or None); `mmd_condition`
    is what the product kernel sees (class labels of the target class of each sample). Everything
    runs under `torch.no_grad` except a guidance method's `correct_x0` when it declares
    `needs_denoiser_gradient` (`posterior`, `lookahead`). The loop knows methods only by their contract
    (`guidance.method`): Δ on x̂0 before the scheduler step, a moved x_{t−1} after it.
    """
    if len(seeds) == 0:
        raise ValueError("seeds must name at least one sample")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if _is_prompt_list(condition) and hasattr(denoiser, "encode_prompts"):
        condition = denoiser.encode_prompts(list(condition))  # once, not at every step (and CFG can concatenate)
    sched = fresh_scheduler(scheduler)
    timestep_kwargs = getattr(denoiser, "timestep_kwargs", None)  # Flux: its σ ladder and resolution shift
    sched.set_timesteps(num_steps, device=device, **(timestep_kwargs(num_steps) if timestep_kwargs else {}))
    timesteps = sched.timesteps
    ptype = denoiser.prediction_type
    x = initial_noise(seeds, denoiser.latent_shape, device) * float(getattr(sched, "init_noise_sigma", 1.0))
    step_kwargs = _step_kwargs(sched, seeds, eta)
    model = _CountingModel(denoiser, condition, cfg_scale, training_alpha_sigma(sched, ptype))
    internal = InternalGuidance(ig_scale, ig_interval)
    method = guidance.method if guidance is not None else None
    trace: list[float] = []

    for i, t in enumerate(timesteps):
        progress = i / len(timesteps)
        w_ig = internal.scale_at(progress)
        strength = guidance.schedule(progress) if guidance is not None else 0.0
        guided = method is not None and strength > 0
        with torch.no_grad():
            x_in = _scale_model_input(sched, x, t)
            c_in = float(_scale_model_input(sched, torch.ones(1, device=x.device), t))
        alpha, sigma = noise_coefficients(sched, i, t, ptype)
        needs_grad = guided and method.needs_denoiser_gradient
        with torch.set_grad_enabled(needs_grad):
            x_vp = x_in.detach().float().requires_grad_(needs_grad)
            out = model(x_vp, t, w_ig)
            x0, eps = to_x0_eps(out, x_vp, alpha, sigma, ptype)
            correction = None
            if guided:
                step = _guidance_step(
                    guidance, model, x_vp, t, alpha, sigma, x0, eps, i, len(timesteps), strength, w_ig, mmd_condition
                )
                correction = method.correct_x0(step)
                if correction is not None:
                    trace.append(float(correction.mmd2))
        with torch.no_grad():
            out = out.detach()
            if correction is not None:
                x, out = _moved_x0(x, x0, eps, correction.delta, alpha, sigma, c_in, ptype)
            x = sched.step(out, t, x, **step_kwargs).prev_sample
            moved = method.correct_prev(x, step) if guided else None
            if moved is not None:
                x = moved.x_prev
                trace.append(float(moved.mmd2))
        if callback is not None:
            callback(i, len(timesteps))

    if guidance is not None and guidance.memory is not None:
        guidance.memory.add(x.detach().float(), mmd_condition)
    return SamplingResult(latents=x.float(), mmd2_trace=trace, denoiser_calls=model.calls)


def _guidance_step(
    guidance: MMDGuidance,
    model: _CountingModel,
    x_vp: torch.Tensor,
    t: torch.Tensor,
    alpha: float,
    sigma: float,
    x0: torch.Tensor,
    eps: torch.Tensor,
    step_index: int,
    num_steps: int,
    strength: float,
    w_ig: float,
    mmd_condition: torch.Tensor | None,
) -> GuidanceStep:
    """Step `step_index` as the guidance method sees it: the state, the prediction, the target and a predictor."""
    return GuidanceStep(
        x_t=x_vp,
        t=float(t),
        alpha=alpha,
        sigma=sigma,
        x0=x0,
        eps=eps,
        step_index=step_index,
        num_steps=num_steps,
        strength=strength,
        target=guidance.target,
        normalization=guidance.normalization,
        memory=guidance.memory,
        x_cond=mmd_condition,
        predict=model.predictor(w_ig),
        alpha_sigma=model.alpha_sigma,
        attraction_floor=guidance.attraction_floor,
    )


def _moved_x0(
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    delta: torch.Tensor,
    alpha: float,
    sigma: float,
    c_in: float,
    ptype: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t', model output) with x̂0 moved by −Δ and ε̂ kept: x_t' = α(x̂0 − Δ) + σ ε̂, re-expressed in the
    model's parameterisation (x_t' unscaled by the scheduler's input scaling `c_in`, in `x`'s dtype)."""
    x0 = x0.detach() - delta
    eps = eps.detach()
    x = ((alpha * x0 + sigma * eps) / c_in).to(x.dtype)
    return x, from_x0_eps(x0, eps, alpha, sigma, ptype)
