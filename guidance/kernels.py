"""Kernels for MMD: sample kernels on flattened samples, condition kernels on labels or embeddings.

Sample kernels act on 2-D tensors ``x`` [n, d] and ``y`` [m, d] (flattening happens in ``guidance.mmd``).
Every sample kernel gives its gram block, its diagonal, and the closed-form gradient

    G_i = Σ_j w_ij ∇_x k(x_i, y_j)

computed from one [n, m] block: no autograd and no [n, m, d] tensor. For a distance kernel
k = f(‖x − y‖²) this is G = x ⊙ rowsum(C) − C @ y with C_ij = 2 w_ij f'(r_ij); for a dot-product kernel
k = g(xᵀy) it is G = C @ y with C_ij = w_ij g'(x_iᵀ y_j).

Precision: float16/bfloat16 inputs are computed and returned in float32; float64 inputs stay float64.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ConditionKernel",
    "CubicPolynomialKernel",
    "DeltaKernel",
    "EmbeddingKernel",
    "InverseMultiquadricKernel",
    "Kernel",
    "MultiBandwidthRBF",
    "ProductKernel",
    "RBFKernel",
    "RandomFourierFeatures",
    "median_pairwise_distance",
    "squared_distances",
]


# --------------------------------------------------------------------------------------------------------
# dtype and shape helpers
# --------------------------------------------------------------------------------------------------------


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the kernel math runs in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_compute(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"kernels take 2-D inputs [n, d]; got x with shape {tuple(x.shape)} and y with shape "
            f"{tuple(y.shape)} (guidance.mmd flattens samples for you)"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features per sample but y has {y.shape[1]}")


def _check_weights(weights: Tensor | None, n: int, m: int) -> None:
    if weights is not None and tuple(weights.shape) != (n, m):
        raise ValueError(f"weights must have shape ({n}, {m}), got {tuple(weights.shape)}")


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances r_ij = ‖x_i − y_j‖², shape [n, m], clamped at 0.

    Both sets are first shifted by the (detached) coordinate-wise median of ``y``; distances are
    translation invariant, and the shift removes most of the cancellation in ‖x‖² + ‖y‖² − 2xᵀy for
    off-centre data. With ``x is y`` the diagonal is exactly 0.
    """
    _check_pair(x, y)
    same = x is y
    x, y = _as_compute(x, y)
    x, y = _centre(x, y)
    r = _sqdist_centred(x, y)
    return r.fill_diagonal_(0.0) if same else r


def _centre(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    # The coordinate-wise median (of at most ~256 evenly spaced rows), not the mean: a few blown-up samples
    # (norm 1e8) in a generated set would drag a mean far from the bulk, and float32 cancellation would
    # then wipe out the kernel values of every other sample.
    rows = y.detach()[:: max(1, y.shape[0] // 256)]
    shift = rows.median(dim=0).values
    return x - shift, y - shift


def _sqdist_centred(x: Tensor, y: Tensor) -> Tensor:
    # ‖x − y‖² = ‖x‖² + ‖y‖² − 2 xᵀy
    r = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.T)
    return r.clamp_min(0.0)


def median_pairwise_distance(y: Tensor, max_points: int = 2048, generator: torch.Generator | None = None) -> float:
    """Median of the Euclidean distances ‖y_i − y_j‖ over distinct pairs i < j (the median heuristic).

    With more than ``max_points`` rows, a subset of ``max_points`` rows is drawn with ``torch.randperm``
    from ``generator`` (default: a CPU generator seeded with 0, so the result is deterministic). For an
    even number of pairs the median is the mean of the two middle distances.
    """
    if y.dim() == 0 or y.shape[0] < 2:
        raise ValueError("y needs at least 2 samples for the median heuristic")
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    y = y.detach().reshape(y.shape[0], -1)
    (y,) = _as_compute(y)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or inf values")
    n = y.shape[0]
    if n > max_points:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        index = torch.randperm(n, generator=generator, device=generator.device)[:max_points]
        y = y[index.to(y.device)]
        n = max_points
    r = squared_distances(y, y)
    i, j = torch.triu_indices(n, n, offset=1, device=y.device)
    distances, _ = r[i, j].sqrt().sort()
    k = distances.numel()
    median = float((distances[(k - 1) // 2] + distances[k // 2]) / 2)
    if not median > 0:
        raise ValueError("y: the median pairwise distance is 0 (too many duplicate samples); set it by hand")
    return median


# --------------------------------------------------------------------------------------------------------
# Sample kernels
# --------------------------------------------------------------------------------------------------------


class Kernel(abc.ABC):
    """A positive-definite kernel on samples (rows of 2-D tensors)."""

    @abc.abstractmethod
    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        """Gram block K_ij = k(x_i, y_j), shape [n, m]."""

    @abc.abstractmethod
    def value_and_grad(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(K [n, m], G [n, d]) with G_i = Σ_j w_ij ∇_x k(x_i, y_j), both from one [n, m] block.

        K is unweighted. ``weights`` [n, m] defaults to all ones.
        """

    def grad(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
        """G_i = Σ_j w_ij ∇_x k(x_i, y_j), shape [n, d] (w = 1 when ``weights`` is None), in closed form."""
        return self.value_and_grad(x, y, weights)[1]

    @abc.abstractmethod
    def diag(self, x: Tensor) -> Tensor:
        """k(x_i, x_i), shape [n]."""


class _DistanceKernel(Kernel):
    """k(x, y) = f(‖x − y‖²); subclasses give f and f'."""

    @abc.abstractmethod
    def _profile(self, r: Tensor) -> Tensor:
        """f(r)."""

    @abc.abstractmethod
    def _profile_and_derivative(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """(f(r), f'(r))."""

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        return self._profile(squared_distances(x, y))

    def value_and_grad(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_pair(x, y)
        _check_weights(weights, x.shape[0], y.shape[0])
        x, y = _as_compute(x, y)
        x, y = _centre(x, y)  # G is translation invariant, so it can use the centred copies too
        k, dk = self._profile_and_derivative(_sqdist_centred(x, y))
        # ∇_x f(‖x − y‖²) = 2 f'(r)(x − y)  →  G = x ⊙ rowsum(C) − C y,  C_ij = 2 w_ij f'(r_ij)
        c = 2.0 * dk if weights is None else 2.0 * dk * weights.to(dk.dtype)
        g = x * c.sum(1, keepdim=True) - c @ y
        return k, g

    def diag(self, x: Tensor) -> Tensor:
        (x,) = _as_compute(x)
        return self._profile(torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))


class RBFKernel(_DistanceKernel):
    """Gaussian kernel k(x, y) = exp(−‖x − y‖² / (2σ²)) with bandwidth σ."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = _check_positive(bandwidth, "bandwidth")

    @classmethod
    def from_median(cls, y: Tensor, max_points: int = 2048, generator: torch.Generator | None = None) -> RBFKernel:
        """σ = median pairwise distance among the reference samples ``y`` [m, ...] (median heuristic)."""
        return cls(median_pairwise_distance(y, max_points=max_points, generator=generator))

    def _profile(self, r: Tensor) -> Tensor:
        return torch.exp(-r / (2.0 * self.bandwidth**2))  # f(r) = exp(−r/(2σ²))

    def _profile_and_derivative(self, r: Tensor) -> tuple[Tensor, Tensor]:
        k = self._profile(r)
        return k, k * (-0.5 / self.bandwidth**2)  # f'(r) = −f(r)/(2σ²)

    def __repr__(self) -> str:
        return f"RBFKernel(bandwidth={self.bandwidth:.6g})"


class MultiBandwidthRBF(_DistanceKernel):
    """Mixture k(x, y) = (1/B) Σ_b exp(−‖x − y‖² / (2σ_b²)) of Gaussian kernels."""

    def __init__(self, bandwidths: Sequence[float]) -> None:
        self.bandwidths = tuple(_check_positive(b, "bandwidths") for b in bandwidths)
        if not self.bandwidths:
            raise ValueError("bandwidths must contain at least one bandwidth")

    @classmethod
    def from_median(
        cls,
        y: Tensor,
        factors: Sequence[float] = (0.5, 1.0, 2.0),
        max_points: int = 2048,
        generator: torch.Generator | None = None,
    ) -> MultiBandwidthRBF:
        """σ_b = factor_b × median pairwise distance among the reference samples ``y``."""
        median = median_pairwise_distance(y, max_points=max_points, generator=generator)
        return cls([f * median for f in factors])

    def _profile(self, r: Tensor) -> Tensor:
        return self._profile_and_derivative(r)[0]

    def _profile_and_derivative(self, r: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.zeros_like(r)
        dk = torch.zeros_like(r)
        for sigma in self.bandwidths:
            k_b = torch.exp(-r / (2.0 * sigma**2))  # exp(−r/(2σ_b²))
            k = k + k_b
            dk = dk + k_b * (-0.5 / sigma**2)
        scale = 1.0 / len(self.bandwidths)
        return k * scale, dk * scale

    def __repr__(self) -> str:
        return f"MultiBandwidthRBF(bandwidths={[round(b, 6) for b in self.bandwidths]})"


class InverseMultiquadricKernel(_DistanceKernel):
    """Inverse multiquadric k(x, y) = c (c² + ‖x − y‖²)^(−1/2), normalised so that k(x, x) = 1."""

    def __init__(self, c: float) -> None:
        self.c = _check_positive(c, "c")

    @classmethod
    def from_median(
        cls, y: Tensor, max_points: int = 2048, generator: torch.Generator | None = None
    ) -> InverseMultiquadricKernel:
        """c = median pairwise distance among the reference samples ``y``."""
        return cls(median_pairwise_distance(y, max_points=max_points, generator=generator))

    def _profile(self, r: Tensor) -> Tensor:
        return self.c * torch.rsqrt(self.c**2 + r)  # f(r) = c (c² + r)^(−1/2)

    def _profile_and_derivative(self, r: Tensor) -> tuple[Tensor, Tensor]:
        k = self._profile(r)
        return k, -0.5 * k / (self.c**2 + r)  # f'(r) = −½ c (c² + r)^(−3/2)

    def __repr__(self) -> str:
        return f"InverseMultiquadricKernel(c={self.c:.6g})"


class CubicPolynomialKernel(Kernel):
    """KID's polynomial kernel k(x, y) = (xᵀy / d + 1)³."""

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        x, y = _as_compute(x, y)
        return (x @ y.T / x.shape[1] + 1.0).pow(3)  # (xᵀy/d + 1)³

    def value_and_grad(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_pair(x, y)
        _check_weights(weights, x.shape[0], y.shape[0])
        x, y = _as_compute(x, y)
        d = x.shape[1]
        s = x @ y.T / d + 1.0
        # ∇_x g(xᵀy) = g'(xᵀy) y with g'(u) = 3(u/d + 1)²/d  →  G = C y
        c = 3.0 * s.pow(2) / d
        if weights is not None:
            c = c * weights.to(c.dtype)
        return s.pow(3), c @ y

    def diag(self, x: Tensor) -> Tensor:
        (x,) = _as_compute(x)
        return (x.pow(2).sum(1) / x.shape[1] + 1.0).pow(3)

    def __repr__(self) -> str:
        return "CubicPolynomialKernel()"


class RandomFourierFeatures(Kernel):
    """Random Fourier features for the Gaussian kernel (Rahimi & Recht 2007).

    φ(x) = sqrt(2/D) cos(W x + b), W ~ N(0, σ⁻² I) [D, d], b ~ U[0, 2π) [D], drawn in float32 on the CPU
    from a ``torch.Generator`` seeded with ``seed`` (identical on every machine and dtype), then
    k(x, y) = φ(x)ᵀφ(y) ≈ exp(−‖x − y‖²/(2σ²)). The parameters are copied lazily to each device/dtype used.
    """

    def __init__(self, bandwidth: float, dim: int, num_features: int = 2048, seed: int = 0) -> None:
        self.bandwidth = _check_positive(bandwidth, "bandwidth")
        if int(dim) < 1:
            raise ValueError(f"dim must be a positive int, got {dim}")
        if int(num_features) < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features}")
        self.dim = int(dim)
        self.num_features = int(num_features)
        self.seed = int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        # W ~ N(0, σ⁻² I), b ~ U[0, 2π)
        self.frequencies = torch.randn(self.num_features, self.dim, generator=generator) / self.bandwidth
        self.phases = torch.rand(self.num_features, generator=generator) * (2.0 * math.pi)
        self._scale = math.sqrt(2.0 / self.num_features)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_median(
        cls,
        y: Tensor,
        num_features: int = 2048,
        seed: int = 0,
        max_points: int = 2048,
        generator: torch.Generator | None = None,
    ) -> RandomFourierFeatures:
        """σ = median pairwise distance among the reference samples ``y`` [m, ...]; dim from ``y``."""
        sigma = median_pairwise_distance(y, max_points=max_points, generator=generator)
        return cls(sigma, dim=y.reshape(y.shape[0], -1).shape[1], num_features=num_features, seed=seed)

    def _params(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.frequencies.to(device=like.device, dtype=like.dtype),
                self.phases.to(device=like.device, dtype=like.dtype),
            )
        return self._cache[key]

    def _check_dim(self, x: Tensor, name: str = "x") -> None:
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(
                f"{name} has {x.shape[1]} features per sample but this RandomFourierFeatures kernel "
                f"was built for dim={self.dim}"
            )

    def project(self, x: Tensor) -> Tensor:
        """W x + b, shape [n, D]."""
        self._check_dim(x)
        (x,) = _as_compute(x)
        w, b = self._params(x)
        return torch.addmm(b, x, w.T)

    def features(self, x: Tensor) -> Tensor:
        """φ(x) = sqrt(2/D) cos(W x + b), shape [n, D]."""
        return self._scale * torch.cos(self.project(x))

    def feature_grad(self, x: Tensor, feature_weights: Tensor, projection: Tensor | None = None) -> Tensor:
        """G_i = ∇φ(x_i)ᵀ s_i = −sqrt(2/D) Wᵀ(sin(W x_i + b) ⊙ s_i), shape [n, d], in O(n·D·d).

        ``feature_weights`` s is [D] (shared by all rows) or [n, D]. ``projection`` may pass a
        precomputed ``project(x)``.
        """
        self._check_dim(x)
        (x,) = _as_compute(x)
        w, _ = self._params(x)
        if projection is None:
            projection = self.project(x)
        s = feature_weights.to(x.dtype)
        # ∂φ_k(x)/∂x = −sqrt(2/D) sin(w_kᵀx + b_k) w_k
        return (-self._scale) * ((torch.sin(projection) * s) @ w)

    def matrix(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        x, y = _as_compute(x, y)
        return self.features(x) @ self.features(y).T  # k(x, y) = φ(x)ᵀφ(y)

    def value_and_grad(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_pair(x, y)
        _check_weights(weights, x.shape[0], y.shape[0])
        x, y = _as_compute(x, y)
        projection = self.project(x)
        fx = self._scale * torch.cos(projection)
        fy = self.features(y)
        s = fy.sum(0) if weights is None else weights.to(fy.dtype) @ fy  # Σ_j w_ij φ(y_j)
        return fx @ fy.T, self.feature_grad(x, s, projection=projection)

    def grad(self, x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
        """O(n·D·d + m·D·d) when ``weights`` is None: Σ_j ∇φ(x_i)ᵀφ(y_j) = ∇φ(x_i)ᵀ Σ_j φ(y_j)."""
        _check_pair(x, y)
        _check_weights(weights, x.shape[0], y.shape[0])
        x, y = _as_compute(x, y)
        fy = self.features(y)
        s = fy.sum(0) if weights is None else weights.to(fy.dtype) @ fy
        return self.feature_grad(x, s)

    def diag(self, x: Tensor) -> Tensor:
        return self.features(x).pow(2).sum(1)  # ‖φ(x)‖² (≈ 1, not exactly 1)

    def __repr__(self) -> str:
        return (
            f"RandomFourierFeatures(bandwidth={self.bandwidth:.6g}, dim={self.dim}, "
            f"num_features={self.num_features}, seed={self.seed})"
        )


# --------------------------------------------------------------------------------------------------------
# Condition kernels and the product kernel
# --------------------------------------------------------------------------------------------------------


class ConditionKernel(abc.ABC):
    """A positive-definite kernel on conditions (class labels or embeddings). Values in [0, 1]."""

    @abc.abstractmethod
    def matrix(self, cx: Tensor, cy: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """K_C[i, j] = k_C(cx_i, cy_j), shape [n, m].

        In ``dtype`` if given, else float32 (float64 for float64 embeddings).
        """

    @abc.abstractmethod
    def diag(self, c: Tensor) -> Tensor:
        """k_C(c_i, c_i), shape [n]."""

    @abc.abstractmethod
    def validate(self, c: Tensor, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` if ``c`` is not a valid batch of conditions."""

    def fit(self, c_ref: Tensor) -> ConditionKernel:  # noqa: B027 - optional hook, default no-op
        """Fit data-dependent parameters on reference conditions (no-op unless overridden). Returns self."""
        return self


class DeltaKernel(ConditionKernel):
    """k_C(c, c') = 1 if c = c' else ``smoothing``, for integer class labels [n].

    With 0 ≤ smoothing ≤ 1 this is (1 − s)·δ + s·1, a sum of positive-definite kernels.
    """

    def __init__(self, smoothing: float = 0.0) -> None:
        smoothing = float(smoothing)
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        self.smoothing = smoothing

    def validate(self, c: Tensor, name: str) -> None:
        if c.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of class labels, got shape {tuple(c.shape)}")
        if c.is_floating_point() or c.is_complex():
            raise ValueError(f"{name} must hold integer class labels, got dtype {c.dtype}")

    def matrix(self, cx: Tensor, cy: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        equal = cx.reshape(-1, 1) == cy.reshape(1, -1).to(cx.device)
        k = equal.to(torch.float32 if dtype is None else dtype)
        if self.smoothing > 0:
            k = self.smoothing + (1.0 - self.smoothing) * k  # 1 if equal else s
        return k

    def diag(self, c: Tensor) -> Tensor:
        return torch.ones(c.shape[0], dtype=torch.float32, device=c.device)

    def __repr__(self) -> str:
        return f"DeltaKernel(smoothing={self.smoothing})"


class EmbeddingKernel(ConditionKernel):
    """Kernel on condition embeddings [n, e] (e.g. text-encoder prompt embeddings).

    ``kind="cosine"``: k_C = (1 + cos(c, c'))/2 ∈ [0, 1]. ``kind="rbf"``: k_C = exp(−‖c − c'‖²/(2h²)) with
    bandwidth h; if ``bandwidth`` is None, h is set by the median heuristic on the first reference
    conditions passed to :meth:`fit` (``guidance.mmd`` calls it with the reference conditions), or failing
    that on the first ``cy`` given to :meth:`matrix`, and then frozen.
    """

    def __init__(self, kind: Literal["cosine", "rbf"] = "cosine", bandwidth: float | None = None) -> None:
        if kind not in ("cosine", "rbf"):
            raise ValueError(f"kind must be 'cosine' or 'rbf', got {kind!r}")
        if kind == "cosine" and bandwidth is not None:
            raise ValueError("bandwidth only applies to kind='rbf'")
        self.kind = kind
        self.bandwidth = None if bandwidth is None else _check_positive(bandwidth, "bandwidth")

    @classmethod
    def from_median(
        cls, c_ref: Tensor, max_points: int = 2048, generator: torch.Generator | None = None
    ) -> EmbeddingKernel:
        """RBF embedding kernel with h = median pairwise distance among ``c_ref``."""
        return cls("rbf", median_pairwise_distance(c_ref, max_points=max_points, generator=generator))

    @property
    def is_fitted(self) -> bool:
        return self.kind == "cosine" or self.bandwidth is not None

    def fit(self, c_ref: Tensor) -> EmbeddingKernel:
        if not self.is_fitted:
            self.bandwidth = median_pairwise_distance(c_ref)
        return self

    def validate(self, c: Tensor, name: str) -> None:
        if c.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor of embeddings [n, e], got shape {tuple(c.shape)}")
        if not c.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of embeddings, got dtype {c.dtype}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"{name} contains NaN or inf values")

    def matrix(self, cx: Tensor, cy: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        _check_pair(cx, cy)
        cx, cy = _as_compute(cx, cy)
        if dtype is not None and dtype == torch.float64:
            cx, cy = cx.double(), cy.double()
        if self.kind == "cosine":
            a = torch.nn.functional.normalize(cx, dim=1, eps=1e-12)
            b = torch.nn.functional.normalize(cy, dim=1, eps=1e-12)
            k = 0.5 * (1.0 + a @ b.T)  # (1 + cos)/2
        else:
            self.fit(cy)
            assert self.bandwidth is not None
            k = torch.exp(-squared_distances(cx, cy) / (2.0 * self.bandwidth**2))
        return k if dtype is None else k.to(dtype)

    def diag(self, c: Tensor) -> Tensor:
        (c,) = _as_compute(c)
        if self.kind == "cosine":
            return 0.5 * (1.0 + (c.norm(dim=1) > 0).to(c.dtype))  # (1 + cos(c, c))/2; 1/2 for c = 0
        return torch.ones(c.shape[0], dtype=c.dtype, device=c.device)

    def __repr__(self) -> str:
        return f"EmbeddingKernel(kind={self.kind!r}, bandwidth={self.bandwidth})"


class ProductKernel:
    """Conditional kernel k((c, x), (c', y)) = k_C(c, c') · k_X(x, y).

    With a :class:`DeltaKernel` every sample only interacts with samples of its own class.
    """

    def __init__(self, sample_kernel: Kernel, condition_kernel: ConditionKernel) -> None:
        if not isinstance(sample_kernel, Kernel):
            raise TypeError(f"sample_kernel must be a Kernel, got {type(sample_kernel).__name__}")
        if not isinstance(condition_kernel, ConditionKernel):
            raise TypeError(f"condition_kernel must be a ConditionKernel, got {type(condition_kernel).__name__}")
        self.sample_kernel = sample_kernel
        self.condition_kernel = condition_kernel

    def _condition_matrix(self, cx: Tensor, cy: Tensor, like: Tensor) -> Tensor:
        return self.condition_kernel.matrix(cx, cy, dtype=like.dtype).to(like.device)

    def matrix(self, x: Tensor, y: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
        """K = K_C(cx, cy) ⊙ K_X(x, y), shape [n, m]."""
        kx = self.sample_kernel.matrix(x, y)
        return self._condition_matrix(cx, cy, kx) * kx

    def value_and_grad(
        self, x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(K_C ⊙ K_X, G) with G_i = Σ_j w_ij k_C(cx_i, cy_j) ∇_x k_X(x_i, y_j)."""
        (xc,) = _as_compute(x)
        kc = self._condition_matrix(cx, cy, xc)
        w = kc if weights is None else weights.to(kc.dtype) * kc
        kx, g = self.sample_kernel.value_and_grad(x, y, w)
        return kc * kx, g

    def grad(self, x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, weights: Tensor | None = None) -> Tensor:
        """G_i = Σ_j w_ij k_C(cx_i, cy_j) ∇_x k_X(x_i, y_j), shape [n, d]."""
        (xc,) = _as_compute(x)
        kc = self._condition_matrix(cx, cy, xc)
        w = kc if weights is None else weights.to(kc.dtype) * kc
        return self.sample_kernel.grad(x, y, w)

    def diag(self, x: Tensor, cx: Tensor) -> Tensor:
        """k_C(c_i, c_i) · k_X(x_i, x_i), shape [n]."""
        kx = self.sample_kernel.diag(x)
        return self.condition_kernel.diag(cx).to(device=kx.device, dtype=kx.dtype) * kx

    def __repr__(self) -> str:
        return f"ProductKernel({self.sample_kernel!r}, {self.condition_kernel!r})"
