"""The attraction term of ∇MMD² and the step bounded by it (no full steps for runaway samples)."""

from __future__ import annotations

import pytest
import torch

from guidance import MMDTarget, RandomFourierFeatures, RBFKernel, attraction_bounded_step, guidance_step


def _setup():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(20, 3, dtype=torch.float64, generator=gen)
    x = 0.5 * torch.randn(5, 3, dtype=torch.float64, generator=gen)
    return x, y


@pytest.mark.parametrize("unbiased", [False, True])
def test_grad_terms_split_the_gradient_into_repulsion_and_the_cross_term(unbiased):
    x, y = _setup()
    kernel = RBFKernel(1.3)
    target = MMDTarget(y, kernel, unbiased=unbiased)
    grad, attraction, value = target.grad_terms(x)
    g, v = target.grad(x)
    assert torch.equal(grad, g) and torch.equal(value, v)
    # the attraction term is the gradient of the cross term −2/(nm) Σ_ir k(x_i, y_r) (autograd reference)
    xr = x.clone().requires_grad_(True)
    cross = -2.0 * kernel.matrix(xr, y).sum() / (len(x) * len(y))
    (expected,) = torch.autograd.grad(cross, xr)
    assert torch.allclose(attraction, expected, rtol=1e-10, atol=1e-14)


def test_grad_terms_with_random_fourier_features():
    x, y = _setup()
    target = MMDTarget(y, RandomFourierFeatures(1.3, 3, num_features=256, seed=0), unbiased=True)
    grad, attraction, _ = target.grad_terms(x)
    g, _ = target.grad(x)
    assert torch.equal(grad, g)
    mu_y = target.kernel.features(y).mean(0)
    xr = x.clone().requires_grad_(True)
    cross = -2.0 * (target.kernel.features(xr) @ mu_y).sum() / len(x)
    (expected,) = torch.autograd.grad(cross, xr)
    assert torch.allclose(attraction, expected, rtol=1e-8, atol=1e-12)


def test_a_sample_out_of_the_references_reach_takes_no_step():
    x, y = _setup()
    x = torch.cat([x, torch.full((1, 3), 40.0, dtype=torch.float64), torch.full((1, 3), 40.5, dtype=torch.float64)])
    target = MMDTarget(y, RBFKernel(1.3), unbiased=False)
    grad, attraction, _ = target.grad_terms(x)
    plain = guidance_step(grad, x, 0.1)
    bounded = attraction_bounded_step(grad, attraction, x, 0.1)
    far = slice(5, 7)
    # the plain normalised step pushes the two runaway samples (only repelling each other) a full s·‖x‖
    assert torch.allclose(plain[far].norm(dim=1), 0.1 * x[far].norm(dim=1))
    assert bounded[far].abs().max() < 1e-12
    # near the references (attraction of the order of the repulsion, here a batch tighter than the
    # references so repulsion is the larger) the step is unchanged
    a = attraction[:5].norm(dim=1)
    r = (grad[:5] - attraction[:5]).norm(dim=1)
    assert (a < r).all() and (a >= 0.1 * r).all()
    assert torch.equal(bounded[:5], plain[:5])
    # in between, the step shrinks in proportion to the attraction left
    half = attraction_bounded_step(grad, attraction, x, 0.1, min_ratio=float(2 * a[0] / r[0]))
    assert torch.allclose(half[0], 0.5 * plain[0])
    assert (bounded.norm(dim=1) <= plain.norm(dim=1) + 1e-12).all()
    assert torch.equal(attraction_bounded_step(grad, attraction, x, 0.0), torch.zeros_like(x))


def test_closed_form_methods_apply_the_attraction_floor_through_the_loop_contract():
    """`noisy_guidance_update` / `latent_guidance_delta` with a floor: runaway samples stay put, the others
    move as without it; without a floor the update is the plain normalised step."""
    from guidance.latent import latent_guidance_delta
    from guidance.noisy import noisy_guidance_update

    x, y = _setup()
    x = torch.cat([x, torch.full((1, 3), 40.0, dtype=torch.float64), torch.full((1, 3), 40.5, dtype=torch.float64)])
    x, y = x.float(), y.float()  # the sampler's dtype
    target = MMDTarget(y, RBFKernel(1.3), unbiased=False)
    grad, _ = target.grad(x)
    plain_x, value = noisy_guidance_update(x, target, 0.1)
    assert torch.equal(plain_x, x - guidance_step(grad, x, 0.1))
    bounded_x, value_b = noisy_guidance_update(x, target, 0.1, attraction_floor=0.1)
    assert torch.equal(value, value_b)
    assert torch.equal(bounded_x[5:], x[5:])  # no attraction left: not pushed further out
    assert torch.equal(bounded_x[:5], plain_x[:5])
    delta, _ = latent_guidance_delta(x, target, 0.1, attraction_floor=0.1)
    torch.testing.assert_close(x - delta, bounded_x, rtol=0, atol=0)
