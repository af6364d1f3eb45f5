"""The sampling loop: schedulers, per-sample seeds, CFG, IG, and the gradient modes."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from guidance import MMDGuidance, MMDTarget, RBFKernel, StrengthSchedule
from guidance.lookahead import ddim_lookahead_x0, lookahead_timesteps
from pipeline.adapters import CallableAdapter
from pipeline.sampling import model_output, sample_latents
from pipeline.testbed import square_mixture

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}


def _bed(name: str):
    denoiser, ddim = square_mixture()
    scheduler = SCHEDULERS[name].from_config(ddim.config)
    return denoiser, scheduler


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sample_does_not_depend_on_batch(name):
    denoiser, scheduler = _bed(name)
    seeds = [11, 12, 13, 14]
    full = sample_latents(denoiser, scheduler, seeds, num_steps=10).latents
    alone = sample_latents(denoiser, scheduler, [13], num_steps=10).latents
    torch.testing.assert_close(full[2:3], alone, rtol=1e-5, atol=1e-5)
    again = sample_latents(denoiser, scheduler, seeds, num_steps=10).latents
    assert torch.equal(full, again)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_lands_on_the_modes(name):
    denoiser, scheduler = _bed(name)
    steps = 100 if name == "ddpm" else 20
    x = sample_latents(denoiser, scheduler, list(range(200)), num_steps=steps).latents
    d = torch.cdist(x.reshape(200, -1).double(), denoiser.means).min(dim=1).values
    # exact denoiser: samples are N(μ_k, 0.5² I₂) → mean distance to the nearest mean ≈ 0.63
    assert 0.45 < d.mean().item() < 0.85, (name, d.mean().item())


def test_cfg_conditional_samples_hit_their_component():
    denoiser, scheduler = _bed("ddim")
    labels = torch.tensor([0, 1, 2, 3] * 8)
    for w in (1.0, 3.0):
        x = sample_latents(denoiser, scheduler, list(range(32)), num_steps=20, condition=labels, cfg_scale=w).latents
        assert torch.equal(denoiser.nearest_component(x), labels)


def test_cfg_scale_one_equals_conditional_and_zero_equals_unconditional():
    denoiser, _ = _bed("ddim")
    x = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    t = torch.tensor(500)
    cond = denoiser(x, t, labels).sample
    unc = denoiser(x, t, None).sample
    out1, calls1 = model_output(denoiser, x, t, labels, cfg_scale=1.0)
    out0, calls0 = model_output(denoiser, x, t, labels, cfg_scale=0.0)
    out2, _ = model_output(denoiser, x, t, labels, cfg_scale=2.0)
    torch.testing.assert_close(out1, cond.float())
    torch.testing.assert_close(out0, unc.float())
    torch.testing.assert_close(out2, (unc + 2 * (cond - unc)).float())  # ε_∅ + w(ε_c − ε_∅)
    assert (calls1, calls0) == (1, 2)


def test_internal_guidance_combines_head_and_final():
    head_out = torch.full((2, 1, 2, 2), 1.0)
    final_out = torch.full((2, 1, 2, 2), 3.0)
    den = CallableAdapter(lambda x, t, c: (final_out, head_out), (1, 2, 2), supports_internal_guidance=True)
    out, _ = model_output(den, torch.zeros(2, 1, 2, 2), 10, None, ig_scale=1.5)
    torch.testing.assert_close(out, torch.full((2, 1, 2, 2), 4.0))  # 1 + 1.5·(3 − 1)
    plain = CallableAdapter(lambda x, t, c: final_out, (1, 2, 2))
    with pytest.raises(ValueError, match="Internal-Guidance head"):
        model_output(plain, torch.zeros(2, 1, 2, 2), 10, None, ig_scale=1.5)


def _guidance(refs, mode, k=None):
    target = MMDTarget(refs, RBFKernel.from_median(refs.flatten(1)), unbiased=False)
    return MMDGuidance(target, StrengthSchedule(0.2), mode=mode, lookahead_steps=k)


def test_lookahead_k1_equals_posterior():
    denoiser, scheduler = _bed("ddim")
    refs, _ = denoiser.sample_data(64, torch.Generator().manual_seed(3))
    seeds = list(range(16))
    post = sample_latents(denoiser, scheduler, seeds, num_steps=8, guidance=_guidance(refs, "posterior"))
    look = sample_latents(denoiser, scheduler, seeds, num_steps=8, guidance=_guidance(refs, "lookahead", 1))
    torch.testing.assert_close(post.latents, look.latents, rtol=1e-6, atol=1e-6)
    assert post.denoiser_calls == look.denoiser_calls == 8


def test_lookahead_call_budget_and_end_to_end():
    denoiser, scheduler = _bed("ddim")
    refs, _ = denoiser.sample_data(64, torch.Generator().manual_seed(3))
    look2 = sample_latents(denoiser, scheduler, list(range(8)), num_steps=6, guidance=_guidance(refs, "lookahead", 2))
    # every step costs min(k, remaining) calls: 2+2+2+2+2+1
    assert look2.denoiser_calls == 11
    e2e = sample_latents(denoiser, scheduler, list(range(8)), num_steps=6, guidance=_guidance(refs, "lookahead", None))
    assert e2e.denoiser_calls == 6 + 5 + 4 + 3 + 2 + 1


def test_lookahead_subsolve_is_differentiable_ddim():
    """The sub-solve equals a hand-written 2-step DDIM, and gradients flow to x_t."""
    denoiser, scheduler = _bed("ddim")
    abar = scheduler.alphas_cumprod.double()

    def alpha_sigma(tau):
        a = float(abar[int(round(tau))])
        return a**0.5, (1 - a) ** 0.5

    def predict(x, tau):
        a, s = alpha_sigma(tau)
        eps = denoiser(x, torch.tensor(round(tau)), None).sample
        return (x - s * eps) / a, eps

    x_t = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t.requires_grad_(True)
    assert lookahead_timesteps(600, 2) == [600, 300]
    x0 = ddim_lookahead_x0(x_t, 600, predict, alpha_sigma, 2)
    a1, s1 = alpha_sigma(300)
    x0_a, eps_a = predict(x_t, 600)
    expected, _ = predict(a1 * x0_a + s1 * eps_a, 300)
    torch.testing.assert_close(x0, expected)
    (g,) = torch.autograd.grad(x0.sum(), x_t)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_strength_schedule_interval_means_no_guidance_outside():
    denoiser, scheduler = _bed("ddim")
    refs, _ = denoiser.sample_data(64, torch.Generator().manual_seed(3))
    target = MMDTarget(refs, RBFKernel.from_median(refs.flatten(1)), unbiased=False)
    off = MMDGuidance(target, StrengthSchedule(0.5, kind="interval", start=0.0, end=0.0))
    plain = sample_latents(denoiser, scheduler, list(range(8)), num_steps=6).latents
    guided_off = sample_latents(denoiser, scheduler, list(range(8)), num_steps=6, guidance=off).latents
    assert torch.equal(plain, guided_off)
