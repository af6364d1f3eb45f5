"""Kernels against closed-form scalar definitions, closed-form gradients against autograd."""

from __future__ import annotations

import math

import pytest
import torch

from guidance.kernels import (
    CubicPolynomialKernel,
    DeltaKernel,
    EmbeddingKernel,
    InverseMultiquadricKernel,
    MultiBandwidthRBF,
    ProductKernel,
    RandomFourierFeatures,
    RBFKernel,
    median_pairwise_distance,
    squared_distances,
)

# ---- scalar reference kernels, written from the definitions (plain Python floats) ------------------------


def sqdist(a: list[float], b: list[float]) -> float:
    return sum((u - v) ** 2 for u, v in zip(a, b, strict=True))


def ref_rbf(a, b, sigma):
    return math.exp(-sqdist(a, b) / (2 * sigma**2))


def ref_imq(a, b, c):
    return c / math.sqrt(c**2 + sqdist(a, b))


def ref_cubic(a, b):
    return (sum(u * v for u, v in zip(a, b, strict=True)) / len(a) + 1) ** 3


def ref_rff(a, b, kernel: RandomFourierFeatures):
    w = kernel.frequencies.double().tolist()
    phase = kernel.phases.double().tolist()
    scale = 2.0 / kernel.num_features
    total = 0.0
    for w_k, b_k in zip(w, phase, strict=True):
        pa = sum(wi * ai for wi, ai in zip(w_k, a, strict=True)) + b_k
        pb = sum(wi * bi for wi, bi in zip(w_k, b, strict=True)) + b_k
        total += math.cos(pa) * math.cos(pb)
    return scale * total


def reference_kernel(kernel):
    """A scalar function k(a, b) for each sample kernel, from its definition."""
    if isinstance(kernel, RBFKernel):
        return lambda a, b: ref_rbf(a, b, kernel.bandwidth)
    if isinstance(kernel, MultiBandwidthRBF):
        return lambda a, b: sum(ref_rbf(a, b, s) for s in kernel.bandwidths) / len(kernel.bandwidths)
    if isinstance(kernel, InverseMultiquadricKernel):
        return lambda a, b: ref_imq(a, b, kernel.c)
    if isinstance(kernel, CubicPolynomialKernel):
        return ref_cubic
    if isinstance(kernel, RandomFourierFeatures):
        return lambda a, b: ref_rff(a, b, kernel)
    raise TypeError(kernel)


def sample_kernels(dim: int = 3):
    return [
        RBFKernel(1.3),
        MultiBandwidthRBF([0.6, 1.2, 2.4]),
        InverseMultiquadricKernel(0.9),
        CubicPolynomialKernel(),
        RandomFourierFeatures(1.1, dim=dim, num_features=64, seed=3),
    ]


KERNEL_IDS = ["rbf", "multi_rbf", "imq", "cubic", "rff"]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.7
    return x, y


@pytest.mark.parametrize("index", range(5), ids=KERNEL_IDS)
def test_matrix_and_diag_match_definition(data, index):
    kernel = sample_kernels()[index]
    x, y = data
    k = reference_kernel(kernel)
    expected = torch.tensor([[k(a, b) for b in y.tolist()] for a in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(kernel.matrix(x, y), expected, rtol=1e-10, atol=1e-12)
    expected_diag = torch.tensor([k(a, a) for a in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(kernel.diag(x), expected_diag, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("index", range(5), ids=KERNEL_IDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_grad_matches_autograd(data, index, weighted):
    kernel = sample_kernels()[index]
    x, y = data
    weights = torch.rand(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = weights if weighted else torch.ones_like(weights)
    xr = x.clone().requires_grad_(True)
    # G_i = Σ_j w_ij ∇_x k(x_i, y_j) = ∇_{x_i} Σ_ij w_ij k(x_i, y_j)
    (expected,) = torch.autograd.grad((w * kernel.matrix(xr, y)).sum(), xr)
    got = kernel.grad(x, y, weights if weighted else None)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    value, got2 = kernel.value_and_grad(x, y, weights if weighted else None)
    torch.testing.assert_close(got2, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(value, kernel.matrix(x, y), rtol=1e-12, atol=1e-12)


def test_grad_of_gram_with_itself_matches_autograd(data):
    # the X–X block: ∇_{x_i} Σ_jl k(x_j, x_l) = 2 Σ_l ∇_1 k(x_i, x_l) for a symmetric kernel
    x, _ = data
    for kernel in sample_kernels():
        xr = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(kernel.matrix(xr, xr).sum(), xr)
        torch.testing.assert_close(2 * kernel.grad(x, x), expected, rtol=1e-9, atol=1e-12)


def test_squared_distances_exact_and_nonnegative():
    x = torch.tensor([[1000.0, 0.0], [1000.0, 1.0]])
    r = squared_distances(x, x)
    torch.testing.assert_close(r, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert (r >= 0).all()


def test_half_precision_is_computed_in_float32(data):
    x, y = data
    for kernel in sample_kernels():
        k = kernel.matrix(x.half(), y.bfloat16())
        assert k.dtype == torch.float32
        assert kernel.grad(x.half(), y.half()).dtype == torch.float32
        torch.testing.assert_close(k, kernel.matrix(x, y).float(), atol=0.05, rtol=0.05)


# ---- median heuristic ---------------------------------------------------------------------------------


def test_median_heuristic_exact_odd_number_of_pairs():
    # points 0, 1, 3: distances {1, 3, 2} → median 2
    y = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert median_pairwise_distance(y) == pytest.approx(2.0, rel=1e-12)
    assert RBFKernel.from_median(y).bandwidth == pytest.approx(2.0, rel=1e-12)
    assert InverseMultiquadricKernel.from_median(y).c == pytest.approx(2.0, rel=1e-12)


def test_median_heuristic_exact_even_number_of_pairs():
    # points 0, 1, 3, 7: distances {1, 3, 7, 2, 6, 4} → sorted 1 2 3 4 6 7 → median (3 + 4)/2
    y = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert median_pairwise_distance(y) == pytest.approx(3.5, rel=1e-6)
    multi = MultiBandwidthRBF.from_median(y, factors=(0.5, 1.0, 2.0))
    assert multi.bandwidths == pytest.approx((1.75, 3.5, 7.0), rel=1e-6)
    rff = RandomFourierFeatures.from_median(y, num_features=16)
    assert rff.bandwidth == pytest.approx(3.5, rel=1e-6) and rff.dim == 1


def test_median_heuristic_subsamples_deterministically():
    y = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    a = median_pairwise_distance(y, max_points=50)
    b = median_pairwise_distance(y, max_points=50)
    assert a == b
    full = median_pairwise_distance(y)
    assert a == pytest.approx(full, rel=0.15)  # a subset's median is close to the full one
    c = median_pairwise_distance(y, max_points=50, generator=torch.Generator().manual_seed(1))
    assert c != a


def test_median_heuristic_rejects_degenerate_input():
    with pytest.raises(ValueError, match="y"):
        median_pairwise_distance(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        median_pairwise_distance(torch.zeros(5, 3))


# ---- random Fourier features -----------------------------------------------------------------------------


def test_rff_is_deterministic_and_approximates_rbf():
    a = RandomFourierFeatures(1.5, dim=3, num_features=4096, seed=7)
    b = RandomFourierFeatures(1.5, dim=3, num_features=4096, seed=7)
    c = RandomFourierFeatures(1.5, dim=3, num_features=4096, seed=8)
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.features(x), b.features(x), rtol=0, atol=0)
    assert not torch.equal(a.features(x), c.features(x))
    # E φ(x)ᵀφ(y) = exp(−‖x − y‖²/(2σ²)); error per entry is O(1/sqrt(D)) ≈ 0.016
    assert (a.matrix(x, x) - RBFKernel(1.5).matrix(x, x)).abs().max() < 0.08


def test_rff_grad_without_weights_uses_feature_sum(data):
    x, y = data
    kernel = RandomFourierFeatures(1.1, dim=3, num_features=64, seed=3)
    s = kernel.features(y).sum(0)
    torch.testing.assert_close(kernel.grad(x, y), kernel.feature_grad(x, s))
    torch.testing.assert_close(kernel.grad(x, y), kernel.grad(x, y, torch.ones(5, 6, dtype=torch.float64)))


def test_rff_rejects_wrong_dim():
    kernel = RandomFourierFeatures(1.0, dim=4, num_features=8)
    with pytest.raises(ValueError, match="x has 3 features per sample"):
        kernel.features(torch.zeros(2, 3))


# ---- condition kernels and product kernel ----------------------------------------------------------------


def test_delta_kernel():
    cx, cy = torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0, 5])
    expected = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(DeltaKernel().matrix(cx, cy), expected)
    smoothed = DeltaKernel(smoothing=0.25).matrix(cx, cy)
    torch.testing.assert_close(smoothed, 0.25 + 0.75 * expected)
    torch.testing.assert_close(DeltaKernel(0.25).diag(cx), torch.ones(3))
    with pytest.raises(ValueError, match="smoothing"):
        DeltaKernel(1.5)


def test_embedding_kernel_cosine_and_rbf():
    cx = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    cy = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    cos = EmbeddingKernel("cosine").matrix(cx, cy)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, (1 + s) / 2], [0.5, 0.5, (1 + s) / 2]], dtype=torch.float64)
    torch.testing.assert_close(cos, expected)
    rbf = EmbeddingKernel("rbf", bandwidth=2.0).matrix(cx, cy)
    expected_rbf = [[math.exp(-sqdist(a, b) / 8.0) for b in cy.tolist()] for a in cx.tolist()]
    torch.testing.assert_close(rbf, torch.tensor(expected_rbf, dtype=torch.float64))
    fitted = EmbeddingKernel("rbf")
    assert not fitted.is_fitted
    fitted.fit(cy)
    assert fitted.bandwidth == pytest.approx(median_pairwise_distance(cy))
    with pytest.raises(ValueError, match="kind"):
        EmbeddingKernel("dot")  # type: ignore[arg-type]


def test_product_kernel_matrix_grad_diag(data):
    x, y = data
    cx, cy = torch.tensor([0, 1, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    kernel = ProductKernel(RBFKernel(1.3), DeltaKernel(0.1))
    kc = [[1.0 if a == b else 0.1 for b in cy.tolist()] for a in cx.tolist()]
    expected = torch.tensor(
        [[kc[i][j] * ref_rbf(a, b, 1.3) for j, b in enumerate(y.tolist())] for i, a in enumerate(x.tolist())],
        dtype=torch.float64,
    )
    torch.testing.assert_close(kernel.matrix(x, y, cx, cy), expected)
    xr = x.clone().requires_grad_(True)
    w = torch.rand(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (auto,) = torch.autograd.grad((w * kernel.matrix(xr, y, cx, cy)).sum(), xr)
    torch.testing.assert_close(kernel.grad(x, y, cx, cy, w), auto)
    torch.testing.assert_close(kernel.diag(x, cx), torch.ones(5, dtype=torch.float64))


# ---- argument validation -----------------------------------------------------------------------------------


def test_kernel_argument_errors():
    with pytest.raises(ValueError, match="bandwidth"):
        RBFKernel(0.0)
    with pytest.raises(ValueError, match="bandwidths"):
        MultiBandwidthRBF([1.0, -1.0])
    with pytest.raises(ValueError, match="c must"):
        InverseMultiquadricKernel(float("nan"))
    with pytest.raises(ValueError, match="x has 3 features per sample but y has 2"):
        RBFKernel(1.0).matrix(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="weights"):
        RBFKernel(1.0).grad(torch.zeros(2, 3), torch.zeros(4, 3), torch.ones(2, 3))
