"""Rectified-flow models (SD3, Flux, Sana) in the sampling loop, against closed forms on the analytic test bed.

x_t = (1 − σ) x0 + σ ε, the model predicts v = ε − x0: x̂0 = x_t − σ v. The exact flow denoiser of a Gaussian
mixture (`FlowGaussianMixtureDenoiser`) makes x̂0, an unguided trajectory and a guided step checkable.
"""

from __future__ import annotations

import math

import pytest
import torch

from guidance import MMDGuidance, MMDTarget, RBFKernel, StrengthSchedule
from guidance.parameterization import from_x0_eps, to_x0_eps
from guidance.schedules import closed_form_step
from pipeline.models.sampling import fresh_scheduler, initial_noise, noise_coefficients, sample_latents
from pipeline.models.testbed import FlowGaussianMixtureDenoiser, square_flow_mixture


def test_velocity_parameterisation_round_trips():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    for sigma in (0.05, 0.5, 0.93):
        alpha = 1 - sigma
        x_t = alpha * x0 + sigma * eps
        v = eps - x0
        got_x0, got_eps = to_x0_eps(v, x_t, alpha, sigma, "flow_prediction")
        torch.testing.assert_close(got_x0, x0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_eps, eps, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(from_x0_eps(x0, eps, alpha, sigma, "flow_prediction"), v)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9])
def test_x0_from_the_velocity_is_the_posterior_mean(sigma):
    """One Gaussian N(μ, s²): E[x0 | x_t] = μ + α s² / (α² s² + σ²) (x_t − α μ) (Tweedie, in closed form)."""
    mu, s = torch.tensor([[1.5, -0.5]]), 0.7
    denoiser = FlowGaussianMixtureDenoiser(mu, s, torch.ones(1))
    x_t = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(sigma * 1000.0)
    v = denoiser(x_t, t, None).sample
    alpha = 1 - sigma
    x0, _ = to_x0_eps(v.double(), x_t.double(), alpha, sigma, "flow_prediction")
    expected = mu.double().view(1, 2, 1, 1) + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (
        x_t.double() - alpha * mu.double().view(1, 2, 1, 1)
    )
    torch.testing.assert_close(x0, expected, atol=1e-6, rtol=1e-6)


def test_noise_levels_come_from_the_flow_scheduler():
    _, scheduler = square_flow_mixture(shift=3.0)
    sched = fresh_scheduler(scheduler)
    sched.set_timesteps(10)
    for i, t in enumerate(sched.timesteps):
        alpha, sigma = noise_coefficients(sched, i, t, "flow_prediction")
        assert sigma == pytest.approx(float(sched.sigmas[i]))
        assert alpha + sigma == pytest.approx(1.0)
        assert float(t) == pytest.approx(sigma * 1000, rel=1e-4)  # the model's timestep is σ × 1000


def test_unguided_flow_sampling_lands_on_the_modes():
    denoiser, scheduler = square_flow_mixture()
    x = sample_latents(denoiser, scheduler, list(range(256)), num_steps=25).latents
    props = torch.bincount(denoiser.nearest_component(x), minlength=4).float() / 256
    tol = 3.5 * math.sqrt(0.25 * 0.75 / 256)
    assert torch.all((props - 0.25).abs() < tol), props
    d = torch.cdist(x.reshape(256, -1).double(), denoiser.means).min(dim=1).values
    assert 0.45 < d.mean().item() < 0.8  # E‖N(0, 0.5² I₂)‖ ≈ 0.63


def _replay(denoiser, scheduler, seeds, steps, target, strength, mode):
    """The guided trajectory written out by hand: x_{i+1} = (1 − σ_{i+1})(x̂0 − Δ) + σ_{i+1} ε̂ (`latent`), or the
    unguided update followed by x_{i+1} − Δ(x_{i+1}) (`noisy`); Δ the per-sample closed-form step."""
    sched = fresh_scheduler(scheduler)
    sched.set_timesteps(steps)
    sigmas = [float(s) for s in sched.sigmas]
    x = initial_noise(seeds, denoiser.latent_shape).double()
    for i, t in enumerate(sched.timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = denoiser(x.float(), t, None).sample.double()
        x0 = x - s * v  # α + σ = 1
        eps = x + (1 - s) * v
        if mode == "latent":
            delta, _ = closed_form_step(x0.float(), target, strength, normalization="per_sample")
            x = (1 - s_next) * (x0 - delta.double()) + s_next * eps
        else:
            x = (1 - s_next) * x0 + s_next * eps
            delta, _ = closed_form_step(x.float(), target, strength, normalization="per_sample")
            x = x - delta.double()
    return x


@pytest.mark.parametrize("mode", ["latent", "noisy"])
def test_a_guided_flow_trajectory_matches_its_closed_form(mode):
    denoiser, scheduler = square_flow_mixture()
    gen = torch.Generator().manual_seed(3)
    refs, _ = denoiser.sample_data(64, gen, weights=torch.tensor([0.7, 0.1, 0.1, 0.1]))
    target = MMDTarget(refs, RBFKernel.from_median(refs.flatten(1)), unbiased=False)
    guidance = MMDGuidance(target, StrengthSchedule(0.2), mode=mode, normalization="per_sample")
    seeds = list(range(16))
    got = sample_latents(denoiser, scheduler, seeds, num_steps=4, guidance=guidance).latents
    expected = _replay(denoiser, scheduler, seeds, 4, target, 0.2, mode)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    unguided = sample_latents(denoiser, scheduler, seeds, num_steps=4).latents
    assert (got - unguided).abs().max() > 1e-2  # the guidance did act


def test_guidance_moves_flow_samples_toward_the_references():
    denoiser, scheduler = square_flow_mixture()
    gen = torch.Generator().manual_seed(5)
    weights = torch.tensor([0.7, 0.1, 0.1, 0.1])
    refs, _ = denoiser.sample_data(200, gen, weights=weights)
    target = MMDTarget(refs, RBFKernel.from_median(refs.flatten(1)), unbiased=False)
    seeds = list(range(128))
    unguided = sample_latents(denoiser, scheduler, seeds, num_steps=20).latents
    guided = sample_latents(
        denoiser, scheduler, seeds, num_steps=20, guidance=MMDGuidance(target, StrengthSchedule(0.1), mode="noisy")
    ).latents
    share = lambda x: float((denoiser.nearest_component(x) == 0).double().mean())  # noqa: E731
    assert share(guided) > share(unguided) + 0.2, (share(unguided), share(guided))
