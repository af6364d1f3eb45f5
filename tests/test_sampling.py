"""The sampling loop: schedulers, per-sample seeds, CFG, IG, and the guidance methods' contract."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from guidance import (
    GUIDANCE_METHODS,
    GUIDANCE_MODES,
    ClassifierFreeGuidance,
    GuidanceMethod,
    GuidanceMode,
    GuidanceStep,
    InternalGuidance,
    MMDGuidance,
    MMDTarget,
    RBFKernel,
    StrengthSchedule,
    X0Correction,
    denoiser_cost,
    make_guidance_method,
    mmd2,
    noisy_guidance_update,
)
from guidance.lookahead import ddim_lookahead_x0, lookahead_timesteps
from pipeline.config import GuidanceName
from pipeline.models.adapters import CallableAdapter
from pipeline.models.sampling import initial_noise, model_output, sample_latents
from pipeline.models.testbed import square_mixture

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


# ---------------------------------------------------------------------------------------------------
# The guidance-method contract: the loop knows methods only through guidance.method.
# ---------------------------------------------------------------------------------------------------


def test_registry_names_are_the_config_choices():
    assert get_args(GuidanceName) == ("none", *GUIDANCE_METHODS)
    assert get_args(GuidanceMode) == tuple(GUIDANCE_METHODS) == GUIDANCE_MODES
    for name, cls in GUIDANCE_METHODS.items():
        assert make_guidance_method(name).name == name and isinstance(make_guidance_method(name), cls)
    with pytest.raises(ValueError, match="guidance method must be one of"):
        make_guidance_method("nope")


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize(("name", "k"), [("latent", 2), ("posterior", 2), ("lookahead", 3), ("noisy", 2)])
def test_declared_cost_is_the_counted_cost(name, k, cfg_scale):
    """`calls_per_step` (what a plan-time estimate asks) equals the calls the loop makes."""
    denoiser, scheduler = _bed("ddim")
    refs, _ = denoiser.sample_data(32, torch.Generator().manual_seed(3))
    guidance = _guidance(refs, name, k)
    labels = torch.tensor([0, 1, 2, 3])
    steps = 5
    res = sample_latents(
        denoiser, scheduler, list(range(4)), num_steps=steps, guidance=guidance, condition=labels, cfg_scale=cfg_scale
    )
    per_row = ClassifierFreeGuidance.calls if cfg_scale != 1.0 else 1
    declared = sum(guidance.method.calls_per_step(steps, steps - i) for i in range(steps))
    assert res.denoiser_calls == per_row * declared
    assert len(res.mmd2_trace) == steps


def test_denoiser_cost_per_step():
    assert denoiser_cost(None, 10) == 1.0
    assert denoiser_cost(make_guidance_method("latent"), 10) == 1.0
    assert denoiser_cost(make_guidance_method("noisy"), 10) == 1.0
    assert denoiser_cost(make_guidance_method("posterior"), 10) == 3.0  # forward + backward ≈ 3 forwards
    # k = 2 over 6 steps: 2+2+2+2+2+1 calls, each with its backward
    assert denoiser_cost(make_guidance_method("lookahead", lookahead_steps=2), 6) == pytest.approx(3 * 11 / 6)
    assert denoiser_cost(make_guidance_method("lookahead", lookahead_steps=None), 4) == pytest.approx(3 * 10 / 4)


class _PinX0(GuidanceMethod):
    """A method defined outside guidance/: move x̂0 onto a fixed point at every step."""

    name = "pin"
    point = torch.tensor([1.5, -0.5]).reshape(1, 2, 1, 1)

    def correct_x0(self, step: GuidanceStep) -> X0Correction:
        return X0Correction(step.x0.detach() - self.point, torch.tensor(0.0))


def test_a_new_method_is_one_class_and_one_registry_entry(monkeypatch):
    """DDIM's last step (ᾱ_prev = 1) lands on the x̂0 the method leaves: the loop applies its Δ."""
    monkeypatch.setitem(GUIDANCE_METHODS, "pin", _PinX0)
    denoiser, scheduler = _bed("ddim")
    refs, _ = denoiser.sample_data(16, torch.Generator().manual_seed(3))
    guidance = _guidance(refs, "pin")
    res = sample_latents(denoiser, scheduler, list(range(4)), num_steps=5, guidance=guidance)
    torch.testing.assert_close(res.latents, _PinX0.point.expand(4, -1, -1, -1), rtol=0, atol=1e-4)
    assert res.mmd2_trace == [0.0] * 5 and res.denoiser_calls == 5


def test_noisy_update_is_the_raw_autograd_gradient_step():
    """noisy_guidance_update with `raw` steps by s·∇ MMD²(x, Y), checked against autograd of mmd2."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 1, 1, generator=gen, dtype=torch.float64)
    y = torch.randn(10, 2, 1, 1, generator=gen, dtype=torch.float64) + 1.0
    kernel = RBFKernel(bandwidth=1.3)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mmd2(xr, y, kernel, unbiased=False), xr)
    new_x, value = noisy_guidance_update(x, MMDTarget(y, kernel, unbiased=False), 0.7, "raw")
    torch.testing.assert_close(new_x, x - 0.7 * grad)
    torch.testing.assert_close(value, mmd2(x, y, kernel, unbiased=False))


def test_noisy_update_in_a_plain_scheduler_loop_is_the_job():
    """The function a diffusers `callback_on_step_end` calls, after each step of a bare DDIM loop,
    gives the latents of `sample_latents(..., mode="noisy")`."""
    denoiser, scheduler = _bed("ddim")
    refs, _ = denoiser.sample_data(32, torch.Generator().manual_seed(3))
    guidance = _guidance(refs, "noisy")
    seeds, steps = list(range(6)), 7
    job = sample_latents(denoiser, scheduler, seeds, num_steps=steps, guidance=guidance)
    scheduler = DDIMScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    x = initial_noise(seeds, denoiser.latent_shape)
    trace = []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(denoiser(x, t, None).sample, t, x).prev_sample
        x, value = noisy_guidance_update(x, guidance.target, guidance.schedule(i / steps), "per_sample")
        trace.append(float(value))
    torch.testing.assert_close(x, job.latents, rtol=1e-6, atol=1e-6)
    assert trace == pytest.approx(job.mmd2_trace, rel=1e-6)


def test_posterior_correction_is_the_chain_rule_through_the_denoiser():
    """PosteriorGuidance's raw Δ = s·∇_{x_t} MMD²(x̂0(x_t), Y), checked against autograd of mmd2."""
    denoiser, scheduler = _bed("ddim")
    refs, _ = denoiser.sample_data(24, torch.Generator().manual_seed(3))
    kernel = RBFKernel.from_median(refs.flatten(1))
    abar = float(scheduler.alphas_cumprod[500])
    alpha, sigma = abar**0.5, (1 - abar) ** 0.5
    x_t = torch.randn(5, 2, 1, 1, generator=torch.Generator().manual_seed(1)).requires_grad_(True)

    def x0_of(x):
        return (x - sigma * denoiser(x, torch.tensor(500), None).sample) / alpha

    (expected,) = torch.autograd.grad(mmd2(x0_of(x_t), refs, kernel, unbiased=False), x_t)
    x0 = x0_of(x_t)
    step = GuidanceStep(
        x_t=x_t,
        t=500.0,
        alpha=alpha,
        sigma=sigma,
        x0=x0,
        eps=(x_t - alpha * x0) / sigma,
        step_index=3,
        num_steps=10,
        strength=0.5,
        target=MMDTarget(refs, kernel, unbiased=False),
        normalization="raw",
        memory=None,
        x_cond=None,
        predict=lambda x, tau: pytest.fail("posterior makes no extra denoiser call"),
        alpha_sigma=lambda tau: pytest.fail("posterior needs no sub-solve schedule"),
    )
    delta, value = make_guidance_method("posterior").correct_x0(step)
    torch.testing.assert_close(delta, 0.5 * expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(value, mmd2(x0.detach(), refs, kernel, unbiased=False), rtol=1e-5, atol=1e-7)
    assert step.progress == 0.3 and step.remaining == 7


def test_output_combiners_apply_inside_their_interval_only():
    ig = InternalGuidance(1.8, interval=(0.0, 0.6))
    assert [ig.scale_at(p) for p in (0.0, 0.59, 0.6, 0.9)] == [1.8, 1.8, 1.0, 1.0]
    assert ClassifierFreeGuidance(3.0).scale_at(0.99) == 3.0 and not ClassifierFreeGuidance(1.0).enabled
    weak, strong = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(ig.combine(weak, strong), weak + 1.8 * (strong - weak))  # out_l + w(out_L − out_l)
    # outside the interval IG is off, so a model without an IG head samples as the plain model
    denoiser, scheduler = _bed("ddim")
    plain = sample_latents(denoiser, scheduler, [1, 2], num_steps=4).latents
    gated = sample_latents(denoiser, scheduler, [1, 2], num_steps=4, ig_scale=1.8, ig_interval=(0.0, 0.0)).latents
    assert torch.equal(plain, gated)
