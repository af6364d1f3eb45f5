"""MMD², gradients, leave-one-out contributions and the sample memory, against closed-form answers."""

from __future__ import annotations

import math

import pytest
import torch

import guidance.mmd as mmd_module
from guidance.kernels import (
    CubicPolynomialKernel,
    DeltaKernel,
    EmbeddingKernel,
    InverseMultiquadricKernel,
    MultiBandwidthRBF,
    ProductKernel,
    RandomFourierFeatures,
    RBFKernel,
)
from guidance.mmd import MMDTarget, SampleMemory, mmd2, mmd2_grad, mmd_contributions, nearest_reference_distance

D = 3  # features per sample in the small cases


# ---- scalar reference kernels from the definitions ---------------------------------------------------------


def sqdist(a, b):
    return sum((u - v) ** 2 for u, v in zip(a, b, strict=True))


def scalar_kernel(kernel):
    if isinstance(kernel, RBFKernel):
        return lambda a, b: math.exp(-sqdist(a, b) / (2 * kernel.bandwidth**2))
    if isinstance(kernel, MultiBandwidthRBF):
        bws = kernel.bandwidths
        return lambda a, b: sum(math.exp(-sqdist(a, b) / (2 * s**2)) for s in bws) / len(bws)
    if isinstance(kernel, InverseMultiquadricKernel):
        return lambda a, b: kernel.c / math.sqrt(kernel.c**2 + sqdist(a, b))
    if isinstance(kernel, CubicPolynomialKernel):
        return lambda a, b: (sum(u * v for u, v in zip(a, b, strict=True)) / len(a) + 1) ** 3
    if isinstance(kernel, RandomFourierFeatures):
        w, ph, scale = (
            kernel.frequencies.double().tolist(),
            kernel.phases.double().tolist(),
            kernel.num_features,
        )

        def rff(a, b):
            total = 0.0
            for w_k, b_k in zip(w, ph, strict=True):
                pa = sum(wi * ai for wi, ai in zip(w_k, a, strict=True)) + b_k
                pb = sum(wi * bi for wi, bi in zip(w_k, b, strict=True)) + b_k
                total += math.cos(pa) * math.cos(pb)
            return 2.0 / scale * total

        return rff
    if isinstance(kernel, ProductKernel):
        kx = scalar_kernel(kernel.sample_kernel)
        kc = kernel.condition_kernel
        if isinstance(kc, DeltaKernel):
            return lambda a, b, ca, cb: (1.0 if ca == cb else kc.smoothing) * kx(a, b)

        def cosine(ca, cb):
            dot = sum(u * v for u, v in zip(ca, cb, strict=True))
            return (1 + dot / math.sqrt(sum(u * u for u in ca) * sum(v * v for v in cb))) / 2

        return lambda a, b, ca, cb: cosine(ca, cb) * kx(a, b)
    raise TypeError(kernel)


def reference_mmd2(x, y, kernel, unbiased, x_cond=None, y_cond=None):
    """Direct double loop over pairs (Gretton et al. 2012, eqs. 3 and 5)."""
    k = scalar_kernel(kernel)
    xs, ys = x.reshape(len(x), -1).tolist(), y.reshape(len(y), -1).tolist()
    n, m = len(xs), len(ys)
    if x_cond is None:
        cxs, cys = [None] * n, [None] * m

        def kk(a, b, ca, cb):
            return k(a, b)
    else:
        cxs, cys = x_cond.tolist(), y_cond.tolist()
        kk = k
    sxx = sum(kk(xs[i], xs[j], cxs[i], cxs[j]) for i in range(n) for j in range(n) if not unbiased or i != j)
    syy = sum(kk(ys[i], ys[j], cys[i], cys[j]) for i in range(m) for j in range(m) if not unbiased or i != j)
    sxy = sum(kk(xs[i], ys[j], cxs[i], cys[j]) for i in range(n) for j in range(m))
    if unbiased:
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    return sxx / n**2 + syy / m**2 - 2 * sxy / (n * m)


def plain_kernels():
    return [
        RBFKernel(1.3),
        MultiBandwidthRBF([0.6, 1.2, 2.4]),
        InverseMultiquadricKernel(0.9),
        CubicPolynomialKernel(),
        RandomFourierFeatures(1.1, dim=D, num_features=64, seed=3),
    ]


def product_kernels():
    return [
        ProductKernel(RBFKernel(1.3), DeltaKernel()),
        ProductKernel(CubicPolynomialKernel(), DeltaKernel(smoothing=0.3)),
        ProductKernel(RandomFourierFeatures(1.1, dim=D, num_features=64, seed=3), DeltaKernel(0.1)),
        ProductKernel(InverseMultiquadricKernel(0.9), EmbeddingKernel("cosine")),
    ]


PLAIN_IDS = ["rbf", "multi_rbf", "imq", "cubic", "rff"]
PRODUCT_IDS = ["rbf*delta", "cubic*delta_smooth", "rff*delta", "imq*cosine"]


def make_data(n=6, m=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    y = 0.8 * torch.randn(m, D, generator=g, dtype=dtype) + 0.5
    return x, y


def make_conditions(kernel, n, m, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    if isinstance(kernel.condition_kernel, DeltaKernel):
        return torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (m,), generator=g)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(m, 4, generator=g, dtype=torch.float64)


# ---- MMD² against the double loop --------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
@pytest.mark.parametrize("index", range(5), ids=PLAIN_IDS)
def test_mmd2_matches_double_loop(index, unbiased):
    kernel = plain_kernels()[index]
    x, y = make_data()
    expected = reference_mmd2(x, y, kernel, unbiased)
    got = mmd2(x, y, kernel, unbiased=unbiased)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(MMDTarget(y, kernel, unbiased=unbiased).mmd2(x)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
@pytest.mark.parametrize("index", range(4), ids=PRODUCT_IDS)
def test_product_kernel_mmd2_matches_double_loop(index, unbiased):
    kernel = product_kernels()[index]
    x, y = make_data()
    cx, cy = make_conditions(kernel, 6, 7)
    expected = reference_mmd2(x, y, kernel, unbiased, cx, cy)
    got = mmd2(x, y, kernel, unbiased=unbiased, x_cond=cx, y_cond=cy)
    assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    target = MMDTarget(y, kernel, y_cond=cy, unbiased=unbiased)
    assert float(target.mmd2(x, x_cond=cx)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_delta_product_kernel_splits_into_per_class_terms():
    # δ-kernel: MMD²_V = Σ_c [S_XX^c/n² + S_YY^c/m² − 2 S_XY^c/(nm)]; classes don't interact
    x, y = make_data(n=8, m=9)
    cx, cy = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0]), torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 0])
    rbf = RBFKernel(1.0)
    total = 0.0
    for c in (0, 1):
        xs, ys = x[cx == c], y[cy == c]
        total += float(
            rbf.matrix(xs, xs).sum() / 64 + rbf.matrix(ys, ys).sum() / 81 - 2 * rbf.matrix(xs, ys).sum() / 72
        )
    got = mmd2(x, y, ProductKernel(rbf, DeltaKernel()), unbiased=False, x_cond=cx, y_cond=cy)
    assert float(got) == pytest.approx(total, rel=1e-12)


def test_mmd2_flattens_samples_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    kernel = RBFKernel(3.0)
    value = mmd2(x, y, kernel)
    assert value.item() == pytest.approx(reference_mmd2(x.detach(), y, kernel, True), rel=1e-10)
    value.backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ---- unbiasedness and the population value for Gaussians ---------------------------------------------------


def _draw_many(draws, n, d, shift, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(draws, n, d, generator=g, dtype=torch.float64)
    ys = torch.randn(draws, n, d, generator=g, dtype=torch.float64) + shift
    return xs, ys


def test_u_statistic_is_unbiased_and_v_statistic_is_not():
    kernel = RBFKernel(1.0)
    draws, v_draws = 2000, 300  # the V-statistic's bias is large: fewer draws show it
    xs, ys = _draw_many(draws, 5, 2, 0.0, seed=1)  # same distribution: population MMD² = 0
    u = torch.stack([mmd2(a, b, kernel, unbiased=True) for a, b in zip(xs, ys, strict=True)])
    v = torch.stack([mmd2(a, b, kernel, unbiased=False) for a, b in zip(xs[:v_draws], ys[:v_draws], strict=True)])
    u_se, v_se = float(u.std()) / math.sqrt(draws), float(v.std()) / math.sqrt(v_draws)
    assert abs(float(u.mean())) < 4 * u_se
    # E MMD²_V = (1/n + 1/m)(k(x,x) − E k(x,x')) = (2/5)(1 − (1/3)) for σ = 1, d = 2
    v_expected = 0.4 * (1 - (1 / 3) ** (2 / 2))
    assert float(v.mean()) > 10 * v_se
    assert float(v.mean()) == pytest.approx(v_expected, abs=4 * v_se)


def test_u_statistic_mean_matches_population_mmd_of_two_gaussians():
    sigma, d, draws = 1.5, 2, 1000
    shift = torch.tensor([0.8, -0.6], dtype=torch.float64)  # ‖μ‖² = 1
    xs, ys = _draw_many(draws, 6, d, shift, seed=2)
    kernel = RBFKernel(sigma)
    u = torch.stack([mmd2(a, b, kernel, unbiased=True) for a, b in zip(xs, ys, strict=True)])
    # E k(x, x') for x ~ N(a, I), x' ~ N(b, I): (σ²/(σ²+2))^(d/2) exp(−‖a − b‖²/(2(σ²+2)))
    base = (sigma**2 / (sigma**2 + 2)) ** (d / 2)
    population = 2 * base - 2 * base * math.exp(-1.0 / (2 * (sigma**2 + 2)))
    se = float(u.std()) / math.sqrt(draws)
    assert population == pytest.approx(0.1175, abs=1e-3)
    assert float(u.mean()) == pytest.approx(population, abs=4 * se)


# ---- leave-one-out contributions ---------------------------------------------------------------------------


def _loo_by_recomputation(x, y, kernel, unbiased, cx=None, cy=None):
    full = mmd2(x, y, kernel, unbiased=unbiased, x_cond=cx, y_cond=cy)
    out = []
    for i in range(len(x)):
        keep = [j for j in range(len(x)) if j != i]
        rest = mmd2(x[keep], y, kernel, unbiased, None if cx is None else cx[keep], cy)
        out.append(full - rest)
    return torch.stack(out)


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
@pytest.mark.parametrize("index", range(5), ids=PLAIN_IDS)
def test_contributions_equal_exact_leave_one_out(index, unbiased):
    kernel = plain_kernels()[index]
    x, y = make_data(n=7, m=5, seed=3)
    expected = _loo_by_recomputation(x, y, kernel, unbiased)
    got = mmd_contributions(x, y, kernel, unbiased=unbiased)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(MMDTarget(y, kernel, unbiased=unbiased).contributions(x), expected)
    assert torch.equal(got.argsort(), expected.argsort())


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
@pytest.mark.parametrize("index", range(4), ids=PRODUCT_IDS)
def test_product_kernel_contributions_equal_exact_leave_one_out(index, unbiased):
    kernel = product_kernels()[index]
    x, y = make_data(n=7, m=6, seed=4)
    cx, cy = make_conditions(kernel, 7, 6, seed=4)
    expected = _loo_by_recomputation(x, y, kernel, unbiased, cx, cy)
    got = mmd_contributions(x, y, kernel, unbiased=unbiased, x_cond=cx, y_cond=cy)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    target = MMDTarget(y, kernel, y_cond=cy, unbiased=unbiased)
    torch.testing.assert_close(target.contributions(x, x_cond=cx), expected)


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
def test_contributions_flag_a_clump_away_from_the_references(unbiased):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(20, D, generator=g, dtype=torch.float64)
    x = torch.randn(8, D, generator=g, dtype=torch.float64)
    clump = [1, 4, 6]  # three near-copies far from every reference
    x[clump] = torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64) + 0.1 * torch.randn(3, D, generator=g)
    scores = mmd_contributions(x, y, RBFKernel(1.0), unbiased=unbiased)
    assert set(scores.argsort(descending=True)[:3].tolist()) == set(clump)
    if unbiased:
        # U-statistic: Δ_i = 2(e_i − ē)/((n−1)(n−2)) − 2(b_i − b̄)/(m(n−1)) sums to zero
        assert float(scores.sum()) == pytest.approx(0.0, abs=1e-12)


# ---- closed-form gradient ----------------------------------------------------------------------------------


def _memory(k, seed=7, cond=None):
    memory = SampleMemory(capacity=10)
    g = torch.Generator().manual_seed(seed)
    memory.add(torch.randn(k, D, generator=g, dtype=torch.float64), cond)
    return memory


@pytest.mark.parametrize("with_memory", [False, True], ids=["no_memory", "memory"])
@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
@pytest.mark.parametrize("index", range(5), ids=PLAIN_IDS)
def test_grad_matches_autograd(index, unbiased, with_memory):
    kernel = plain_kernels()[index]
    x, y = make_data(n=5, m=6, seed=6)
    memory = _memory(4) if with_memory else None
    xr = x.clone().requires_grad_(True)
    joint = xr if memory is None else torch.cat([xr, memory.samples])
    value = mmd2(joint, y, kernel, unbiased=unbiased)
    (expected,) = torch.autograd.grad(value, xr)
    target = MMDTarget(y, kernel, unbiased=unbiased)
    grad, got_value = target.grad(x, memory=memory)
    assert grad.shape == x.shape and not grad.requires_grad
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-12)
    assert float(got_value) == pytest.approx(value.item(), rel=1e-9, abs=1e-12)
    # MMDTarget.mmd2 with memory is the same value and differentiable
    xr2 = x.clone().requires_grad_(True)
    value2 = target.mmd2(xr2, memory=memory)
    (auto2,) = torch.autograd.grad(value2, xr2)
    torch.testing.assert_close(auto2, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("with_memory", [False, True], ids=["no_memory", "memory"])
@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
@pytest.mark.parametrize("index", range(4), ids=PRODUCT_IDS)
def test_product_kernel_grad_matches_autograd(index, unbiased, with_memory):
    kernel = product_kernels()[index]
    x, y = make_data(n=5, m=6, seed=8)
    cx, cy = make_conditions(kernel, 9, 6, seed=8)
    cx, cm = cx[:5], cx[5:]
    memory = _memory(4, cond=cm) if with_memory else None
    xr = x.clone().requires_grad_(True)
    joint, joint_c = (xr, cx) if memory is None else (torch.cat([xr, memory.samples]), torch.cat([cx, cm]))
    value = mmd2(joint, y, kernel, unbiased=unbiased, x_cond=joint_c, y_cond=cy)
    (expected,) = torch.autograd.grad(value, xr)
    grad, got_value = MMDTarget(y, kernel, y_cond=cy, unbiased=unbiased).grad(x, x_cond=cx, memory=memory)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-12)
    assert float(got_value) == pytest.approx(value.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
@pytest.mark.parametrize("kernel", [RBFKernel(0.9), CubicPolynomialKernel()], ids=["rbf", "cubic"])
def test_grad_matches_central_finite_differences(kernel, unbiased):
    x, y = make_data(n=4, m=5, seed=9)
    memory = _memory(2, seed=10)
    grad, _ = mmd2_grad(x, y, kernel, unbiased=unbiased, memory=memory)
    h = 1e-6
    numeric = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            plus, minus = x.clone(), x.clone()
            plus[i, j] += h
            minus[i, j] -= h
            f_plus = mmd2(torch.cat([plus, memory.samples]), y, kernel, unbiased)
            f_minus = mmd2(torch.cat([minus, memory.samples]), y, kernel, unbiased)
            numeric[i, j] = (f_plus - f_minus) / (2 * h)  # central difference, O(h²) error
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


def test_grad_in_float32_and_half_inputs():
    x, y = make_data(n=6, m=8, seed=11, dtype=torch.float32)
    kernel = RBFKernel(1.2)
    target = MMDTarget(y, kernel)
    grad32, value32 = target.grad(x)
    grad64, value64 = target.grad(x.double())
    assert grad32.dtype == torch.float32 and value32.dtype == torch.float32
    torch.testing.assert_close(grad32, grad64.float(), rtol=1e-4, atol=1e-6)
    grad16, value16 = target.grad(x.half())
    assert grad16.dtype == torch.float32 and value16.dtype == torch.float32
    torch.testing.assert_close(grad16, grad32, rtol=0.05, atol=2e-3)
    assert mmd2(x.half(), y.half(), kernel).dtype == torch.float32
    assert mmd_contributions(x.bfloat16(), y, kernel).dtype == torch.float32


def test_mmd2_grad_functional_defaults_to_v_statistic():
    x, y = make_data(seed=12)
    kernel = RBFKernel(1.0)
    grad, value = mmd2_grad(x, y, kernel)
    expected_grad, expected_value = MMDTarget(y, kernel, unbiased=False).grad(x)
    torch.testing.assert_close(grad, expected_grad)
    assert float(value) == pytest.approx(reference_mmd2(x, y, kernel, unbiased=False), rel=1e-10)


def test_chunked_reference_sums_match_unchunked(monkeypatch):
    x, y = make_data(n=5, m=9, seed=13)
    memory = _memory(6, seed=14)
    for kernel in (RBFKernel(1.1), RandomFourierFeatures(1.1, dim=D, num_features=32)):
        whole = MMDTarget(y, kernel)
        grad_whole, value_whole = whole.grad(x, memory=memory)
        monkeypatch.setattr(mmd_module, "_CHUNK_ENTRIES", 5)  # force one or two rows per chunk
        chunked = MMDTarget(y, kernel)
        grad_chunked, value_chunked = chunked.grad(x, memory=_memory(6, seed=14))
        monkeypatch.undo()
        torch.testing.assert_close(chunked.yy_term, whole.yy_term)
        torch.testing.assert_close(grad_chunked, grad_whole)
        torch.testing.assert_close(value_chunked, value_whole)


def test_memory_cache_follows_memory_changes():
    x, y = make_data(n=4, m=6, seed=15)
    kernel = RBFKernel(1.0)
    target = MMDTarget(y, kernel)
    memory = _memory(3, seed=16)
    for step in range(3):
        _, value = target.grad(x, memory=memory)
        expected = mmd2(torch.cat([x, memory.samples]), y, kernel)
        assert float(value) == pytest.approx(float(expected), rel=1e-10), step
        memory.add(torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(step)))
    memory.clear()
    _, value = target.grad(x, memory=memory)
    assert float(value) == pytest.approx(float(mmd2(x, y, kernel)), rel=1e-10)


# ---- random Fourier features -----------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False], ids=["U", "V"])
def test_rff_mmd2_approximates_rbf_mmd2(unbiased):
    g = torch.Generator().manual_seed(17)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = torch.randn(60, 2, generator=g, dtype=torch.float64) + torch.tensor([1.2, 0.0], dtype=torch.float64)
    rbf = RBFKernel.from_median(y)
    rff = RandomFourierFeatures(rbf.bandwidth, dim=2, num_features=4096, seed=0)
    exact = float(mmd2(x, y, rbf, unbiased=unbiased))
    approx = float(mmd2(x, y, rff, unbiased=unbiased))
    assert 0.1 < exact < 0.5
    assert abs(approx - exact) < 0.02  # Monte-Carlo error of D = 4096 features
    # and the closed-form RFF gradient is the gradient of its own MMD²
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(mmd2(xr, y, rff, unbiased=unbiased), xr)
    grad, _ = MMDTarget(y, rff, unbiased=unbiased).grad(x)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-12)


# ---- argument validation -----------------------------------------------------------------------------------


def test_feature_mismatch_names_both_arguments():
    with pytest.raises(ValueError, match="x has 64 features per sample but y has 32"):
        mmd2(torch.zeros(4, 64), torch.zeros(4, 32), RBFKernel(1.0))
    with pytest.raises(ValueError, match="x has 12 features per sample but y has 32"):
        MMDTarget(torch.randn(4, 32), RBFKernel(1.0)).grad(torch.zeros(4, 3, 4))
    with pytest.raises(ValueError, match="x has 5 features per sample but the RandomFourierFeatures"):
        mmd2(torch.zeros(4, 5), torch.zeros(4, 5), RandomFourierFeatures(1.0, dim=4, num_features=8))


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y, k: mmd2(x, y, k),
        lambda x, y, k: mmd_contributions(x, y, k),
        lambda x, y, k: MMDTarget(y, k).grad(x),
        lambda x, y, k: MMDTarget(y, k).mmd2(x),
        lambda x, y, k: MMDTarget(y, k).contributions(x),
    ],
    ids=["mmd2", "contributions", "target.grad", "target.mmd2", "target.contributions"],
)
def test_bad_samples_are_named(call):
    kernel = RBFKernel(1.0)
    good_x, good_y = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="x is empty"):
        call(torch.zeros(0, 3), good_y, kernel)
    with pytest.raises(ValueError, match="y is empty"):
        call(good_x, torch.zeros(0, 3), kernel)
    bad = good_x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        call(bad, good_y, kernel)
    bad = good_y.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        call(good_x, bad, kernel)


def test_too_few_samples_are_named():
    kernel = RBFKernel(1.0)
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="x has 1 sample but the unbiased"):
        mmd2(x[:1], y, kernel, unbiased=True)
    with pytest.raises(ValueError, match="y has 1 sample but the unbiased"):
        mmd2(x, y[:1], kernel, unbiased=True)
    mmd2(x[:1], y[:1], kernel, unbiased=False)  # the V-statistic is defined for one sample each
    with pytest.raises(ValueError, match="x has 2 samples but leave-one-out"):
        mmd_contributions(x[:2], y, kernel, unbiased=True)
    with pytest.raises(ValueError, match="x has 1 sample but leave-one-out"):
        mmd_contributions(x[:1], y, kernel, unbiased=False)
    with pytest.raises(ValueError, match="x has 2 samples but leave-one-out"):
        MMDTarget(y, kernel).contributions(x[:2])
    with pytest.raises(ValueError, match="y has 1 sample"):
        MMDTarget(y[:1], kernel, unbiased=True)
    target = MMDTarget(y, kernel, unbiased=True)
    with pytest.raises(ValueError, match="x has 1 sample"):
        target.grad(x[:1])
    memory = SampleMemory(4)
    memory.add(torch.randn(2, 3))
    target.grad(x[:1], memory=memory)  # one generated sample plus memory is enough


def test_condition_errors_are_named():
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    cx, cy = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 1])
    product = ProductKernel(RBFKernel(1.0), DeltaKernel())
    with pytest.raises(ValueError, match="x_cond is required"):
        mmd2(x, y, product, y_cond=cy)
    with pytest.raises(ValueError, match="y_cond is required"):
        mmd2(x, y, product, x_cond=cx)
    with pytest.raises(ValueError, match="y_cond is required"):
        MMDTarget(y, product)
    with pytest.raises(ValueError, match="x_cond is required"):
        MMDTarget(y, product, y_cond=cy).grad(x)
    with pytest.raises(ValueError, match="x_cond has 3 entries but x has 4 samples"):
        mmd2(x, y, product, x_cond=cx[:3], y_cond=cy)
    with pytest.raises(ValueError, match="y_cond has 4 entries but y has 5 samples"):
        mmd_contributions(x, y, product, x_cond=cx, y_cond=cy[:4])
    with pytest.raises(ValueError, match="x_cond was given"):
        mmd2(x, y, RBFKernel(1.0), x_cond=cx)
    with pytest.raises(ValueError, match="y_cond was given"):
        MMDTarget(y, RBFKernel(1.0), y_cond=cy)
    with pytest.raises(ValueError, match="x_cond must hold integer class labels"):
        mmd2(x, y, product, x_cond=cx.float(), y_cond=cy)
    embedding = ProductKernel(RBFKernel(1.0), EmbeddingKernel())
    with pytest.raises(ValueError, match="x_cond has 8 features per condition but y_cond has 6"):
        mmd2(x, y, embedding, x_cond=torch.randn(4, 8), y_cond=torch.randn(5, 6))
    memory = SampleMemory(3)
    memory.add(torch.randn(2, 3))  # no conditions
    with pytest.raises(ValueError, match="memory holds samples without conditions"):
        MMDTarget(y, product, y_cond=cy).grad(x, x_cond=cx, memory=memory)
    wrong = SampleMemory(3)
    wrong.add(torch.randn(2, 7))
    with pytest.raises(ValueError, match="memory has 7 features per sample but y has 3"):
        MMDTarget(y, RBFKernel(1.0)).grad(x, memory=wrong)


def test_embedding_rbf_condition_kernel_is_fitted_on_reference_conditions():
    x, y = make_data(n=5, m=6)
    cy = torch.randn(6, 4, dtype=torch.float64)
    kernel = ProductKernel(RBFKernel(1.0), EmbeddingKernel("rbf"))
    MMDTarget(y, kernel, y_cond=cy)
    fitted = EmbeddingKernel.from_median(cy)
    assert kernel.condition_kernel.bandwidth == pytest.approx(fitted.bandwidth)


# ---- sample memory ----------------------------------------------------------------------------------------


def test_sample_memory_fifo_eviction_keeps_conditions_aligned():
    memory = SampleMemory(capacity=5)
    batch1 = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1).expand(3, 2, 2)
    batch2 = torch.arange(3, 7, dtype=torch.float32).reshape(4, 1, 1).expand(4, 2, 2)
    memory.add(batch1, torch.tensor([10, 11, 12]))
    assert len(memory) == 3
    memory.add(batch2, torch.tensor([13, 14, 15, 16]))
    assert len(memory) == 5
    assert memory.samples.shape == (5, 4)
    assert memory.samples[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]  # oldest first, 0 and 1 evicted
    assert memory.conditions is not None and memory.conditions.tolist() == [12, 13, 14, 15, 16]
    memory.add(torch.arange(8, dtype=torch.float32).reshape(8, 1, 1).expand(8, 2, 2), torch.arange(8))
    assert memory.samples[:, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]  # a batch larger than capacity
    assert memory.conditions.tolist() == [3, 4, 5, 6, 7]
    memory.clear()
    assert len(memory) == 0 and memory.conditions is None


def test_sample_memory_rejects_feature_mismatch():
    memory = SampleMemory(capacity=5)
    memory.add(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x has 3 features per sample but the memory has 4"):
        memory.add(torch.zeros(2, 3))


def test_sample_memory_is_detached_and_copied():
    memory = SampleMemory(capacity=4)
    x = torch.randn(3, 2, requires_grad=True)
    memory.add(x * 1.0)
    assert not memory.samples.requires_grad
    source = torch.zeros(2, 2)
    memory.add(source)
    source += 5.0
    assert float(memory.samples[-1].abs().sum()) == 0.0


def test_sample_memory_capacity_zero_and_errors():
    disabled = SampleMemory(0)
    disabled.add(torch.randn(3, 2))
    assert len(disabled) == 0
    with pytest.raises(ValueError, match="capacity"):
        SampleMemory(-1)
    memory = SampleMemory(4)
    with pytest.raises(ValueError, match="cond has 2 entries but x has 3 samples"):
        memory.add(torch.randn(3, 2), torch.tensor([0, 1]))
    memory.add(torch.randn(3, 2))
    with pytest.raises(ValueError, match="cond was given"):
        memory.add(torch.randn(1, 2), torch.tensor([0]))
    labelled = SampleMemory(4)
    labelled.add(torch.randn(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="cond is required"):
        labelled.add(torch.randn(1, 2))


def test_nearest_reference_distance_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 1.0], [6.0, 8.0], [3.0, 0.0]])
    assert nearest_reference_distance(x, y).tolist() == pytest.approx([1.0, 4.0])
    with pytest.raises(ValueError, match="feature sizes"):
        nearest_reference_distance(x, torch.zeros(2, 3))


def test_far_sample_gets_the_neutral_closed_form_contribution():
    """A sample with k ≈ 0 to everything: Δ = 2/(n(n−1)) · (B/m − A/(n−2)), A = Σ_{i≠j} k(x_i, x_j),
    B = Σ k(x_i, y_j) (both without the far sample, whose terms are 0) — the same for every far sample,
    and below the score of typical samples when the batch is tighter than the references."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(30, 2, generator=gen)
    near = 0.3 * torch.randn(12, 2, generator=gen)  # tighter than the references
    far = torch.tensor([[1e3, 0.0], [0.0, -1e3]])
    x = torch.cat([near, far]).double()
    kernel = RBFKernel(1.0)
    delta = mmd_contributions(x, y.double(), kernel, unbiased=True)
    n, m = len(x), len(y)
    kxx = kernel.matrix(near.double(), near.double())
    a = float(kxx.sum() - kxx.diagonal().sum())
    b = float(kernel.matrix(near.double(), y.double()).sum())
    expected = 2.0 / (n * (n - 1)) * (b / m - a / (n - 2))
    assert float(delta[-1]) == pytest.approx(expected, rel=1e-9)
    assert float(delta[-2]) == pytest.approx(expected, rel=1e-9)
    assert float(delta[-1]) < float(delta[:-2].max())  # so a plain ranking would keep it over some near samples
