"""MMD guidance proven on the analytic Gaussian-mixture test bed (exact denoiser, no training)."""

from __future__ import annotations

import math

import pytest
import torch

from guidance import MMDGuidance, MMDTarget, RBFKernel, StrengthSchedule, mmd2
from pipeline.models.sampling import sample_latents
from pipeline.models.testbed import square_mixture

TARGET_WEIGHTS = torch.tensor([0.55, 0.25, 0.15, 0.05])
N_SAMPLES = 256
BATCH = 128
STEPS = 25


def _proportions(denoiser, x: torch.Tensor) -> torch.Tensor:
    comp = denoiser.nearest_component(x)
    return torch.bincount(comp, minlength=4).float() / len(comp)


def _generate(denoiser, scheduler, guidance=None, seeds=range(N_SAMPLES), **kwargs) -> torch.Tensor:
    seeds = list(seeds)
    out = [
        sample_latents(denoiser, scheduler, seeds[i : i + BATCH], num_steps=STEPS, guidance=guidance, **kwargs).latents
        for i in range(0, len(seeds), BATCH)
    ]
    return torch.cat(out)


@pytest.fixture(scope="module")
def bed():
    denoiser, scheduler = square_mixture()
    gen = torch.Generator().manual_seed(1234)
    refs, _ = denoiser.sample_data(200, gen, weights=TARGET_WEIGHTS)
    held_out, _ = denoiser.sample_data(400, gen, weights=TARGET_WEIGHTS)
    unguided = _generate(denoiser, scheduler)
    return denoiser, scheduler, refs, held_out, unguided


def test_unguided_matches_prior_proportions(bed):
    denoiser, _, _, _, unguided = bed
    props = _proportions(denoiser, unguided)
    # Binomial standard error at p = 0.25, n = 256 is 0.027; allow 3.5 standard errors.
    tol = 3.5 * math.sqrt(0.25 * 0.75 / N_SAMPLES)
    print(f"\nunguided mode proportions: {props.tolist()} (prior 0.25 each, tol {tol:.3f})")
    assert torch.all((props - 0.25).abs() < tol), props
    # and each sample sits on a mode: mean distance to its mean ≈ std·√d·(1 ± small)
    d = torch.cdist(unguided.reshape(len(unguided), -1).double(), denoiser.means).min(dim=1).values
    assert 0.4 < d.mean().item() < 0.9  # E‖N(0, 0.5² I₂)‖ = 0.5·√(π/2) ≈ 0.63


@pytest.mark.parametrize("mode", ["latent", "posterior", "lookahead", "noisy"])
def test_guidance_halves_mmd_and_moves_proportions(bed, mode):
    denoiser, scheduler, refs, held_out, unguided = bed
    kernel = RBFKernel.from_median(refs.flatten(1))
    target = MMDTarget(refs, kernel, unbiased=False)
    guidance = MMDGuidance(target, StrengthSchedule(0.1), mode=mode, lookahead_steps=3)
    guided = _generate(denoiser, scheduler, guidance)
    before = mmd2(unguided, held_out, kernel).item()
    after = mmd2(guided, held_out, kernel).item()
    props_u, props_g = _proportions(denoiser, unguided), _proportions(denoiser, guided)
    err_u = (props_u - TARGET_WEIGHTS).abs().sum().item()
    err_g = (props_g - TARGET_WEIGHTS).abs().sum().item()
    print(
        f"\n[{mode}] MMD² to held-out: unguided {before:.5f} -> guided {after:.5f} (x{after / before:.3f}); "
        f"proportions unguided {[round(p, 3) for p in props_u.tolist()]} guided "
        f"{[round(p, 3) for p in props_g.tolist()]} target {TARGET_WEIGHTS.tolist()}; "
        f"L1 error {err_u:.3f} -> {err_g:.3f}"
    )
    assert after < 0.5 * before
    assert err_g < 0.5 * err_u
    # fidelity: guided samples stay on the data manifold (near a mode)
    d = torch.cdist(guided.reshape(len(guided), -1).double(), denoiser.means).min(dim=1).values
    assert d.mean().item() < 1.0


def test_product_kernel_guidance_steers_each_class(bed):
    """Per-class targets: an unconditional model + δ-kernel on labels yields class-specific samples."""
    from guidance import DeltaKernel, ProductKernel

    denoiser, scheduler, _, _, _ = bed
    gen = torch.Generator().manual_seed(7)
    # reference "class" 0 = component 0 only, class 1 = component 3 only
    refs0 = denoiser.means[0].float() + 0.5 * torch.randn(60, 2, generator=gen)
    refs1 = denoiser.means[3].float() + 0.5 * torch.randn(60, 2, generator=gen)
    refs = torch.cat([refs0, refs1]).reshape(-1, 2, 1, 1)
    labels = torch.cat([torch.zeros(60), torch.ones(60)]).long()
    kernel = ProductKernel(RBFKernel.from_median(refs.flatten(1)), DeltaKernel())
    target = MMDTarget(refs, kernel, y_cond=labels, unbiased=False)
    guidance = MMDGuidance(target, StrengthSchedule(0.1))
    mmd_cond = torch.arange(64) % 2
    x = sample_latents(
        denoiser, scheduler, list(range(64)), num_steps=STEPS, guidance=guidance, mmd_condition=mmd_cond
    ).latents
    comp = denoiser.nearest_component(x)
    acc0 = (comp[mmd_cond == 0] == 0).float().mean().item()
    acc1 = (comp[mmd_cond == 1] == 3).float().mean().item()
    print(f"\nproduct kernel: class 0 -> mode 0 in {acc0:.2f}, class 1 -> mode 3 in {acc1:.2f} (chance 0.25)")
    assert acc0 > 0.7 and acc1 > 0.7


def test_public_code_scheme_sequential_with_memory_bank(bed):
    """One sample at a time against a memory bank of finished samples (reset every 100), noisy-latent
    gradient: the public MMD-Guidance code's coupling. Proportions still move toward the target."""
    from guidance import SampleMemory

    denoiser, scheduler, refs, held_out, unguided = bed
    kernel = RBFKernel.from_median(refs.flatten(1))
    guidance = MMDGuidance(
        MMDTarget(refs, kernel, unbiased=False), StrengthSchedule(0.1), mode="noisy", memory=SampleMemory(100)
    )
    out = []
    for i in range(N_SAMPLES):
        if len(guidance.memory) >= 100:
            guidance.memory.clear()
        out.append(sample_latents(denoiser, scheduler, [i], num_steps=STEPS, guidance=guidance).latents)
    guided = torch.cat(out)
    before, after = mmd2(unguided, held_out, kernel).item(), mmd2(guided, held_out, kernel).item()
    print(f"\n[sequential+memory, noisy] MMD² {before:.5f} -> {after:.5f}")
    assert after < 0.5 * before
