"""Maximum Mean Discrepancy: MMD², its closed-form gradient, leave-one-out contributions, sample memory.

Notation (DESIGN.md §2): generated set X = {x_1..x_n}, references Y = {y_1..y_m}, kernel k. Samples of
any shape [n, ...] are flattened to [n, d]. With a :class:`~guidance.kernels.ProductKernel` every sample
carries a condition (class label or embedding) and conditions are required on both sides.

V-statistic:  MMD²_V = 1/n² Σ_ij k(x_i,x_j) + 1/m² Σ_rs k(y_r,y_s) − 2/(nm) Σ_ir k(x_i,y_r)
U-statistic:  MMD²_U = 1/(n(n−1)) Σ_{i≠j} k(x_i,x_j) + 1/(m(m−1)) Σ_{r≠s} k(y_r,y_s) − 2/(nm) Σ_ir k(x_i,y_r)
(Gretton et al. 2012, eqs. 3 and 5).

Precision: float16/bfloat16 inputs are computed in float32 and results (values, gradients,
contributions) are float32; float64 inputs are computed and returned in float64.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .kernels import Kernel, ProductKernel, RandomFourierFeatures, compute_dtype

__all__ = ["MMDTarget", "SampleMemory", "mmd2", "mmd2_grad", "mmd_contributions"]

AnyKernel = Kernel | ProductKernel

# Row-chunk size (in gram entries) for the one-off Y–Y and memory sums, to bound peak memory.
_CHUNK_ENTRIES = 1 << 24


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def _flatten_samples(t: Tensor, name: str) -> Tensor:
    """[n, ...] → [n, d], checking it is a non-empty, finite tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a leading sample dimension, got a scalar")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    flat = t.reshape(t.shape[0], -1)
    if flat.shape[1] == 0:
        raise ValueError(f"{name} has 0 features per sample (shape {tuple(t.shape)})")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return flat


def _check_features(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} has {a.shape[1]} features per sample but {b_name} has {b.shape[1]}")


def _check_count(count: int, needed: int, name: str, purpose: str) -> None:
    if count < needed:
        noun = "sample" if count == 1 else "samples"
        raise ValueError(f"{name} has {count} {noun} but {purpose} needs at least {needed}")


def _estimator(unbiased: bool) -> str:
    return "the unbiased (U-statistic) MMD² estimator" if unbiased else "the V-statistic MMD² estimator"


def _check_rff(kernel: AnyKernel, flat: Tensor, name: str) -> None:
    if isinstance(kernel, RandomFourierFeatures) and flat.shape[1] != kernel.dim:
        raise ValueError(
            f"{name} has {flat.shape[1]} features per sample but the RandomFourierFeatures kernel was "
            f"built for dim={kernel.dim}"
        )


def _validate_conditions(
    kernel: AnyKernel, cond: Tensor | None, name: str, count: int, sample_name: str
) -> Tensor | None:
    """Conditions are required with a ProductKernel and refused otherwise; one per sample."""
    if not isinstance(kernel, ProductKernel):
        if cond is not None:
            raise ValueError(
                f"{name} was given but the kernel ({type(kernel).__name__}) is not a ProductKernel; "
                f"use ProductKernel(kernel, DeltaKernel()) for class-conditional MMD"
            )
        return None
    if cond is None:
        raise ValueError(f"{name} is required because the kernel is a ProductKernel (conditional MMD)")
    cond = torch.as_tensor(cond)
    if cond.dim() == 0 or cond.shape[0] != count:
        entries = 0 if cond.dim() == 0 else cond.shape[0]
        raise ValueError(f"{name} has {entries} entries but {sample_name} has {count} samples")
    kernel.condition_kernel.validate(cond, name)
    return cond.detach()


def _check_condition_features(a: Tensor | None, b: Tensor | None, a_name: str, b_name: str) -> None:
    if a is not None and b is not None and a.dim() == 2 and b.dim() == 2 and a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} has {a.shape[1]} features per condition but {b_name} has {b.shape[1]}")


def _prepare_condition_kernel(kernel: AnyKernel, y_cond: Tensor | None) -> None:
    # data-dependent condition kernels (an RBF embedding kernel without bandwidth) fit on the references
    if isinstance(kernel, ProductKernel) and y_cond is not None:
        kernel.condition_kernel.fit(y_cond)


def _validate_pair(
    x: Tensor,
    y: Tensor,
    kernel: AnyKernel,
    x_cond: Tensor | None,
    y_cond: Tensor | None,
    min_x: int,
    min_y: int,
    purpose: str,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    if not isinstance(kernel, (Kernel, ProductKernel)):
        raise TypeError(f"kernel must be a Kernel or ProductKernel, got {type(kernel).__name__}")
    xf = _flatten_samples(x, "x")
    yf = _flatten_samples(y, "y")
    _check_features(xf, yf, "x", "y")
    _check_rff(kernel, xf, "x")
    _check_count(xf.shape[0], min_x, "x", purpose)
    _check_count(yf.shape[0], min_y, "y", purpose)
    xc = _validate_conditions(kernel, x_cond, "x_cond", xf.shape[0], "x")
    yc = _validate_conditions(kernel, y_cond, "y_cond", yf.shape[0], "y")
    _check_condition_features(xc, yc, "x_cond", "y_cond")
    _prepare_condition_kernel(kernel, yc)
    dtype = compute_dtype(xf, yf)
    yf = yf.to(device=xf.device, dtype=dtype)
    if yc is not None:
        yc = yc.to(xf.device)
    return xf.to(dtype), yf, xc, yc


# --------------------------------------------------------------------------------------------------------
# Shared math
# --------------------------------------------------------------------------------------------------------


def _matrix(kernel: AnyKernel, a: Tensor, b: Tensor, ca: Tensor | None, cb: Tensor | None) -> Tensor:
    if isinstance(kernel, ProductKernel):
        assert ca is not None and cb is not None
        return kernel.matrix(a, b, ca, cb)
    return kernel.matrix(a, b)


def _value_and_grad(
    kernel: AnyKernel,
    a: Tensor,
    b: Tensor,
    ca: Tensor | None,
    cb: Tensor | None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    if isinstance(kernel, ProductKernel):
        assert ca is not None and cb is not None
        return kernel.value_and_grad(a, b, ca, cb, weights)
    return kernel.value_and_grad(a, b, weights)


def _gram_sums(
    kernel: AnyKernel, a: Tensor, ca: Tensor | None, b: Tensor, cb: Tensor | None, same: bool
) -> tuple[Tensor, Tensor]:
    """(Σ_ij K(a, b)_ij, trace) computed in row chunks; the trace is 0 unless ``same`` (a is b)."""
    rows = max(1, _CHUNK_ENTRIES // max(1, b.shape[0]))
    total = a.new_zeros(())
    trace = a.new_zeros(())
    for start in range(0, a.shape[0], rows):
        stop = min(start + rows, a.shape[0])
        block = _matrix(kernel, a[start:stop], b, None if ca is None else ca[start:stop], cb)
        total = total + block.sum()
        if same:
            trace = trace + block[:, start:stop].diagonal().sum()
    return total, trace


def _feature_sums(kernel: RandomFourierFeatures, a: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_i φ(a_i) [D], Σ_i ‖φ(a_i)‖²) computed in row chunks."""
    rows = max(1, _CHUNK_ENTRIES // kernel.num_features)
    total = a.new_zeros(kernel.num_features)
    sq = a.new_zeros(())
    for start in range(0, a.shape[0], rows):
        f = kernel.features(a[start : start + rows])
        total = total + f.sum(0)
        sq = sq + f.pow(2).sum()
    return total, sq


def _mmd2_from_blocks(kxx: Tensor, kyy: Tensor, kxy: Tensor, unbiased: bool) -> Tensor:
    n, m = kxx.shape[0], kyy.shape[0]
    if unbiased:
        # MMD²_U = 1/(n(n−1)) Σ_{i≠j} k(x_i,x_j) + 1/(m(m−1)) Σ_{r≠s} k(y_r,y_s) − 2/(nm) Σ k(x_i,y_r)
        xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        return xx + yy - 2.0 * kxy.mean()
    # MMD²_V = mean K_XX + mean K_YY − 2 mean K_XY (Gretton et al. 2012, eq. 5)
    return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()


def _mmd2_from_features(fx: Tensor, fy: Tensor, unbiased: bool) -> Tensor:
    n, m = fx.shape[0], fy.shape[0]
    if unbiased:
        sx, sy = fx.sum(0), fy.sum(0)
        # Σ_{i≠j} φ_iᵀφ_j = ‖Σφ‖² − Σ‖φ_i‖²
        xx = (sx @ sx - fx.pow(2).sum()) / (n * (n - 1))
        yy = (sy @ sy - fy.pow(2).sum()) / (m * (m - 1))
        return xx + yy - 2.0 * (sx @ sy) / (n * m)
    return (fx.mean(0) - fy.mean(0)).pow(2).sum()  # MMD²_V = ‖mean φ(X) − mean φ(Y)‖²


def _leave_one_out(a: Tensor, d: Tensor, b: Tensor, m: int, unbiased: bool) -> Tensor:
    """Δ_i = MMD²(X) − MMD²(X∖{x_i}) from a_i = Σ_j k(x_i,x_j), d_i = k(x_i,x_i), b_i = Σ_r k(x_i,y_r).

    The Y–Y term cancels. With ā, b̄ the means over i and S = Σ_i a_i:
      V: Δ_i = [2(a_i − ā) − d_i + S/n²]/(n−1)² − 2(b_i − b̄)/(m(n−1))
      U: Δ_i = 2(e_i − ē)/((n−1)(n−2)) − 2(b_i − b̄)/(m(n−1)),  e_i = a_i − d_i   (so Σ_i Δ_i = 0)
    """
    n = a.shape[0]
    # cross term: −2 S_XY/(nm) + 2(S_XY − b_i)/((n−1)m) = −2(b_i − b̄)/(m(n−1))
    cross = -2.0 * (b - b.mean()) / (m * (n - 1))
    if unbiased:
        e = a - d
        # O/(n(n−1)) − (O − 2e_i)/((n−1)(n−2)) with O = Σ e_i
        return 2.0 * (e - e.mean()) / ((n - 1) * (n - 2)) + cross
    # S/n² − (S − 2a_i + d_i)/(n−1)²
    return (2.0 * (a - a.mean()) - d + a.sum() / n**2) / (n - 1) ** 2 + cross


# --------------------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------------------


def mmd2(
    x: Tensor,
    y: Tensor,
    kernel: AnyKernel,
    unbiased: bool = True,
    x_cond: Tensor | None = None,
    y_cond: Tensor | None = None,
) -> Tensor:
    """MMD²(X, Y) as a 0-dim tensor, differentiable w.r.t. ``x`` and ``y`` by autograd.

    Args:
        x: generated samples [n, ...]; y: reference samples [m, ...] (same number of features).
        kernel: a sample :class:`Kernel`, or a :class:`ProductKernel` (then ``x_cond``/``y_cond`` needed).
        unbiased: U-statistic (drops the X–X and Y–Y diagonals; needs n, m ≥ 2) or V-statistic.

    With :class:`RandomFourierFeatures` the statistic is computed from feature means in O((n+m)·D·d).
    """
    xf, yf, xc, yc = _validate_pair(
        x, y, kernel, x_cond, y_cond, 2 if unbiased else 1, 2 if unbiased else 1, _estimator(unbiased)
    )
    if isinstance(kernel, RandomFourierFeatures):
        return _mmd2_from_features(kernel.features(xf), kernel.features(yf), unbiased)
    kxx = _matrix(kernel, xf, xf, xc, xc)
    kyy = _matrix(kernel, yf, yf, yc, yc)
    kxy = _matrix(kernel, xf, yf, xc, yc)
    return _mmd2_from_blocks(kxx, kyy, kxy, unbiased)


def nearest_reference_distance(x: Tensor, y: Tensor, chunk: int = 1024) -> Tensor:
    """min_j ‖x_i − y_j‖ for each row of ``x`` [n, ...] against ``y`` [m, ...], shape [n] (float64).

    The filter's support check: a sample many median distances from every reference has kernel value ≈ 0
    with all of them, so its leave-one-out MMD² effect is the same neutral value as any other such sample
    (−2(k̄_XX − k̄_XY)/(n − 1)): MMD cannot rank it, and it is no image of the target domain.
    """
    xf = x.detach().reshape(x.shape[0], -1).double()
    yf = y.detach().reshape(y.shape[0], -1).double().to(xf.device)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {xf.shape[1]} vs {yf.shape[1]}")
    if yf.shape[0] == 0:
        raise ValueError("y needs at least one reference")
    if len(xf) == 0:
        return xf.new_zeros(0)
    # direct differences, not the matmul expansion: bit-identical whatever the thread count (shard bytes)
    return torch.cat(
        [torch.cdist(c, yf, compute_mode="donot_use_mm_for_euclid_dist").min(1).values for c in xf.split(chunk)]
    )


def mmd_contributions(
    x: Tensor,
    y: Tensor,
    kernel: AnyKernel,
    unbiased: bool = True,
    x_cond: Tensor | None = None,
    y_cond: Tensor | None = None,
) -> Tensor:
    """Exact leave-one-out effects Δ_i = MMD²(X, Y) − MMD²(X∖{x_i}, Y), shape [n].

    Higher Δ_i means removing x_i lowers MMD² more: the sample pulls the set away from the references.
    O(n(n+m)) kernel evaluations (two blocks, row sums only). Needs n ≥ 2 (n ≥ 3 when unbiased).
    """
    xf, yf, xc, yc = _validate_pair(
        x,
        y,
        kernel,
        x_cond,
        y_cond,
        3 if unbiased else 2,
        2 if unbiased else 1,
        "leave-one-out contributions with " + _estimator(unbiased),
    )
    if isinstance(kernel, RandomFourierFeatures):
        sy, _ = _feature_sums(kernel, yf)
        return _contributions_from_features(kernel, xf, sy, yf.shape[0], unbiased)
    return _contributions_from_blocks(kernel, xf, xc, yf, yc, unbiased)


def _contributions_from_blocks(
    kernel: AnyKernel, xf: Tensor, xc: Tensor | None, yf: Tensor, yc: Tensor | None, unbiased: bool
) -> Tensor:
    kxx = _matrix(kernel, xf, xf, xc, xc)
    kxy = _matrix(kernel, xf, yf, xc, yc)
    return _leave_one_out(kxx.sum(1), kxx.diagonal(), kxy.sum(1), yf.shape[0], unbiased)


def _contributions_from_features(
    kernel: RandomFourierFeatures, xf: Tensor, y_feature_sum: Tensor, m: int, unbiased: bool
) -> Tensor:
    fx = kernel.features(xf)
    a = fx @ fx.sum(0)  # Σ_j φ_iᵀφ_j
    return _leave_one_out(a, fx.pow(2).sum(1), fx @ y_feature_sum, m, unbiased)


def mmd2_grad(
    x: Tensor,
    y: Tensor,
    kernel: AnyKernel,
    unbiased: bool = False,
    x_cond: Tensor | None = None,
    y_cond: Tensor | None = None,
    memory: SampleMemory | None = None,
) -> tuple[Tensor, Tensor]:
    """(∇_x MMD² shaped like ``x``, MMD²) in closed form; see :meth:`MMDTarget.grad`.

    Builds a one-off :class:`MMDTarget` (so it pays for the Y–Y term): reuse a target when guiding.
    """
    return MMDTarget(y, kernel, y_cond=y_cond, unbiased=unbiased).grad(x, x_cond=x_cond, memory=memory)


# --------------------------------------------------------------------------------------------------------
# Sample memory
# --------------------------------------------------------------------------------------------------------


class SampleMemory:
    """Bounded FIFO memory of finished clean samples (and their conditions), joined to the generated set.

    Samples are stored flattened, detached and copied, in float32 (float64 if added as float64), oldest
    first. When more than ``capacity`` samples are held, the oldest are evicted. ``capacity=0`` disables
    the memory (``add`` is a no-op). Either every added batch has conditions or none does.
    """

    _uids = itertools.count()

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
        self._capacity = capacity
        self._samples: Tensor | None = None
        self._conditions: Tensor | None = None
        self._version = 0
        self._uid = next(SampleMemory._uids)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def version(self) -> int:
        """Incremented on every change; lets an :class:`MMDTarget` cache sums over the memory."""
        return self._version

    @property
    def key(self) -> tuple[int, int]:
        """(instance id, version): identifies the current content."""
        return (self._uid, self._version)

    def __len__(self) -> int:
        return 0 if self._samples is None else self._samples.shape[0]

    @property
    def samples(self) -> Tensor:
        """Stored samples [k, d] (oldest first); [0, 0] when empty."""
        return torch.empty(0, 0) if self._samples is None else self._samples

    @property
    def conditions(self) -> Tensor | None:
        """Stored conditions aligned with :attr:`samples`, or None if the memory holds none."""
        return self._conditions

    def add(self, x: Tensor, cond: Tensor | None = None) -> None:
        """Append samples ``x`` [k, ...] (and their conditions ``cond`` [k] or [k, e]); evict the oldest."""
        flat = _flatten_samples(x, "x")
        if cond is not None:
            cond = torch.as_tensor(cond)
            if cond.dim() == 0 or cond.shape[0] != flat.shape[0]:
                entries = 0 if cond.dim() == 0 else cond.shape[0]
                raise ValueError(f"cond has {entries} entries but x has {flat.shape[0]} samples")
        if self._capacity == 0:
            return
        if self._samples is not None:
            _check_features(flat, self._samples, "x", "the memory")
            if cond is None and self._conditions is not None:
                raise ValueError("cond is required: the memory already holds conditions")
            if cond is not None and self._conditions is None:
                raise ValueError("cond was given but the memory holds samples without conditions")
            if cond is not None and self._conditions is not None and cond.shape[1:] != self._conditions.shape[1:]:
                raise ValueError(
                    f"cond has shape {tuple(cond.shape[1:])} per sample but the memory holds "
                    f"{tuple(self._conditions.shape[1:])}"
                )
        new = flat.detach()[-self._capacity :].to(compute_dtype(flat)).clone()
        new_cond = None if cond is None else cond.detach()[-self._capacity :].clone()
        if self._samples is None:
            self._samples, self._conditions = new, new_cond
        else:
            self._samples = torch.cat([self._samples, new.to(self._samples)])[-self._capacity :]
            if self._conditions is not None and new_cond is not None:
                self._conditions = torch.cat([self._conditions, new_cond.to(self._conditions)])[-self._capacity :]
        self._version += 1

    def clear(self) -> None:
        """Forget every sample."""
        self._samples = None
        self._conditions = None
        self._version += 1

    def __repr__(self) -> str:
        return f"SampleMemory(capacity={self._capacity}, size={len(self)})"


# --------------------------------------------------------------------------------------------------------
# Precomputed target
# --------------------------------------------------------------------------------------------------------


class MMDTarget:
    """The reference side of MMD², precomputed once for guidance and filtering.

    Stores the flattened, detached references, the constant Y–Y term of the chosen estimator, and for
    :class:`RandomFourierFeatures` the reference feature mean, so that the cross term costs O(n·D·d)
    instead of O(n·m·d). ``memory`` (a :class:`SampleMemory`) extends the generated set with constant
    finished samples; sums over the memory are cached until it changes.
    """

    def __init__(self, y: Tensor, kernel: AnyKernel, y_cond: Tensor | None = None, unbiased: bool = True) -> None:
        if not isinstance(kernel, (Kernel, ProductKernel)):
            raise TypeError(f"kernel must be a Kernel or ProductKernel, got {type(kernel).__name__}")
        yf = _flatten_samples(y, "y")
        _check_rff(kernel, yf, "y")
        _check_count(yf.shape[0], 2 if unbiased else 1, "y", _estimator(unbiased))
        yc = _validate_conditions(kernel, y_cond, "y_cond", yf.shape[0], "y")
        _prepare_condition_kernel(kernel, yc)
        self.kernel = kernel
        self.unbiased = bool(unbiased)
        self._y = yf.detach().to(compute_dtype(yf))
        self._y_cond = yc
        self._memory_cache: tuple[tuple, dict[str, Tensor]] | None = None
        m = self._y.shape[0]
        with torch.no_grad():
            if isinstance(kernel, RandomFourierFeatures):
                sy, qy = _feature_sums(kernel, self._y)
                self._y_feature_sum = sy
                self._y_feature_mean = sy / m
                # U: (‖Σφ(y)‖² − Σ‖φ(y)‖²)/(m(m−1));  V: ‖mean φ(y)‖²
                self._yy = (sy @ sy - qy) / (m * (m - 1)) if unbiased else self._y_feature_mean.pow(2).sum()
            else:
                total, trace = _gram_sums(kernel, self._y, yc, self._y, yc, same=True)
                # U: Σ_{r≠s} k(y_r,y_s)/(m(m−1));  V: Σ_rs k(y_r,y_s)/m²
                self._yy = (total - trace) / (m * (m - 1)) if unbiased else total / m**2

    # ---- properties --------------------------------------------------------------------------------

    @property
    def num_references(self) -> int:
        return self._y.shape[0]

    @property
    def dim(self) -> int:
        """Number of features per (flattened) sample."""
        return self._y.shape[1]

    @property
    def references(self) -> Tensor:
        """The flattened references [m, d]."""
        return self._y

    @property
    def reference_conditions(self) -> Tensor | None:
        return self._y_cond

    @property
    def yy_term(self) -> Tensor:
        """The constant Y–Y term of MMD² for the chosen estimator."""
        return self._yy

    # ---- internals ---------------------------------------------------------------------------------

    def _to_device(self, device: torch.device) -> None:
        if self._y.device == device:
            return
        self._y = self._y.to(device)
        self._yy = self._yy.to(device)
        if self._y_cond is not None:
            self._y_cond = self._y_cond.to(device)
        if isinstance(self.kernel, RandomFourierFeatures):
            self._y_feature_sum = self._y_feature_sum.to(device)
            self._y_feature_mean = self._y_feature_mean.to(device)
        self._memory_cache = None

    def _prepare(self, x: Tensor, x_cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        xf = _flatten_samples(x, "x")
        _check_features(xf, self._y, "x", "y")
        xc = _validate_conditions(self.kernel, x_cond, "x_cond", xf.shape[0], "x")
        _check_condition_features(xc, self._y_cond, "x_cond", "y_cond")
        self._to_device(xf.device)
        return xf.to(compute_dtype(xf, self._y)), xc

    def _reference(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
        return self._y.to(dtype), self._y_cond, self._yy.to(dtype)

    def _memory_parts(
        self, memory: SampleMemory | None, xf: Tensor
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]] | None:
        """Memory samples/conditions on x's device and dtype, and cached sums over them (None if empty)."""
        if memory is None:
            return None
        if not isinstance(memory, SampleMemory):
            raise TypeError(f"memory must be a SampleMemory, got {type(memory).__name__}")
        if len(memory) == 0:
            return None
        ms = memory.samples.to(device=xf.device, dtype=xf.dtype)
        _check_features(ms, self._y, "memory", "y")
        mc = memory.conditions
        if isinstance(self.kernel, ProductKernel):
            if mc is None:
                raise ValueError("memory holds samples without conditions but the kernel is a ProductKernel")
            mc = mc.to(xf.device)
            _check_condition_features(mc, self._y_cond, "memory conditions", "y_cond")
        elif mc is not None:
            raise ValueError("memory holds conditions but the kernel is not a ProductKernel")
        key = (memory.key, xf.device, xf.dtype)
        if self._memory_cache is None or self._memory_cache[0] != key:
            y, yc, _ = self._reference(xf.dtype)
            with torch.no_grad():
                if isinstance(self.kernel, RandomFourierFeatures):
                    s, q = _feature_sums(self.kernel, ms)
                    stats = {"feature_sum": s, "feature_sq": q}
                else:
                    s_mm, t_mm = _gram_sums(self.kernel, ms, mc, ms, mc, same=True)
                    s_my, _ = _gram_sums(self.kernel, ms, mc, y, yc, same=False)
                    stats = {"sum_mm": s_mm, "trace_mm": t_mm, "sum_my": s_my}
            self._memory_cache = (key, stats)
        return ms, mc, self._memory_cache[1]

    def _check_total(self, n: int, k: int) -> None:
        if self.unbiased and n + k < 2:
            raise ValueError(f"x has {n} sample(s) (plus {k} in memory) but {_estimator(True)} needs at least 2 in all")

    # ---- public API --------------------------------------------------------------------------------

    def mmd2(self, x: Tensor, x_cond: Tensor | None = None, memory: SampleMemory | None = None) -> Tensor:
        """MMD²(X ∪ memory, Y), differentiable w.r.t. ``x`` by autograd (memory and Y are constants)."""
        xf, xc = self._prepare(x, x_cond)
        mem = self._memory_parts(memory, xf)
        n, k = xf.shape[0], (0 if mem is None else mem[0].shape[0])
        self._check_total(n, k)
        big_n, m = n + k, self.num_references
        y, yc, yy = self._reference(xf.dtype)
        kernel = self.kernel
        if isinstance(kernel, RandomFourierFeatures):
            fx = kernel.features(xf)
            sz, qz = fx.sum(0), fx.pow(2).sum()
            if mem is not None:
                sz, qz = sz + mem[2]["feature_sum"], qz + mem[2]["feature_sq"]
            mu_y = self._y_feature_mean.to(xf.dtype)
            if not self.unbiased:
                return (sz / big_n - mu_y).pow(2).sum()  # ‖mean φ(Z) − mean φ(Y)‖²
            return (sz @ sz - qz) / (big_n * (big_n - 1)) + yy - 2.0 * (sz @ mu_y) / big_n
        kxx = _matrix(kernel, xf, xf, xc, xc)
        s_zz, t_z, s_zy = kxx.sum(), kxx.diagonal().sum(), _matrix(kernel, xf, y, xc, yc).sum()
        if mem is not None:
            ms, mc, stats = mem
            # Σ_{Z×Z} = Σ_{X×X} + 2 Σ_{X×M} + Σ_{M×M}
            s_zz = s_zz + 2.0 * _matrix(kernel, xf, ms, xc, mc).sum() + stats["sum_mm"]
            t_z, s_zy = t_z + stats["trace_mm"], s_zy + stats["sum_my"]
        return self._combine(s_zz, t_z, s_zy, yy, big_n, m)

    def _combine(self, s_zz: Tensor, t_z: Tensor, s_zy: Tensor, yy: Tensor, big_n: int, m: int) -> Tensor:
        if self.unbiased:
            # MMD²_U = (Σ_ZZ − tr K_ZZ)/(N(N−1)) + YY − 2 Σ_ZY/(N m)
            return (s_zz - t_z) / (big_n * (big_n - 1)) + yy - 2.0 * s_zy / (big_n * m)
        return s_zz / big_n**2 + yy - 2.0 * s_zy / (big_n * m)  # MMD²_V

    def grad(
        self, x: Tensor, x_cond: Tensor | None = None, memory: SampleMemory | None = None
    ) -> tuple[Tensor, Tensor]:
        """(∇_{x_i} MMD² for every i, shaped like ``x``; MMD²), in closed form without autograd.

        With Z = X ∪ memory, N = |Z|:
          V: ∇_{x_i} = (2/N²) Σ_{j∈Z} ∇k(x_i,z_j) − (2/(N m)) Σ_r ∇k(x_i,y_r)
          U: ∇_{x_i} = (2/(N(N−1))) Σ_{j∈Z, j≠i} ∇k(x_i,z_j) − (2/(N m)) Σ_r ∇k(x_i,y_r)
        using only the blocks K(X, Z) and K(X, Y) (for RFF: feature sums, O(n·D·d)). Both outputs are
        detached; memory samples are constants.
        """
        grad, _, value = self._grad(x, x_cond, memory, split=False)
        return grad, value

    def grad_terms(
        self, x: Tensor, x_cond: Tensor | None = None, memory: SampleMemory | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(∇ MMD², its attraction term, MMD²): the attraction term is the cross term's part of the gradient,
        −(2/(N m)) Σ_r ∇k(x_i,y_r) (minus it points toward the references); ∇ − attraction is the batch
        repulsion. Far from every reference the attraction vanishes (RBF) while the repulsion does not:
        see `guidance.schedules.attraction_bounded_step`."""
        return self._grad(x, x_cond, memory, split=True)

    def _grad(
        self, x: Tensor, x_cond: Tensor | None, memory: SampleMemory | None, split: bool
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        with torch.no_grad():
            xf, xc = self._prepare(x.detach(), x_cond)
            mem = self._memory_parts(memory, xf)
            n, k = xf.shape[0], (0 if mem is None else mem[0].shape[0])
            self._check_total(n, k)
            big_n, m = n + k, self.num_references
            y, yc, yy = self._reference(xf.dtype)
            kernel = self.kernel
            if isinstance(kernel, RandomFourierFeatures):
                projection = kernel.project(xf)
                fx = (2.0 / kernel.num_features) ** 0.5 * torch.cos(projection)  # φ = sqrt(2/D) cos(Wx + b)
                sz, qz = fx.sum(0), fx.pow(2).sum()
                if mem is not None:
                    sz, qz = sz + mem[2]["feature_sum"], qz + mem[2]["feature_sq"]
                mu_y = self._y_feature_mean.to(xf.dtype)
                s_att = -2.0 * mu_y / big_n
                if self.unbiased:
                    value = (sz @ sz - qz) / (big_n * (big_n - 1)) + yy - 2.0 * (sz @ mu_y) / big_n
                    # s_i = 2(Σ_{j≠i} φ(z_j))/(N(N−1)) − 2 mean φ(Y)/N
                    s = 2.0 * (sz.unsqueeze(0) - fx) / (big_n * (big_n - 1)) - 2.0 * mu_y / big_n
                else:
                    value = (sz / big_n - mu_y).pow(2).sum()
                    s = 2.0 * sz / big_n**2 - 2.0 * mu_y / big_n  # s = 2 Σφ(Z)/N² − 2 mean φ(Y)/N
                g = kernel.feature_grad(xf, s, projection=projection)
                att = kernel.feature_grad(xf, s_att, projection=projection).reshape(x.shape) if split else None
                return g.reshape(x.shape), att, value
            if mem is None:
                z, zc = xf, xc
            else:
                z = torch.cat([xf, mem[0]])
                zc = None if xc is None or mem[1] is None else torch.cat([xc, mem[1].to(xc.device)])
            weights = None
            if self.unbiased:
                weights = torch.ones(n, big_n, dtype=xf.dtype, device=xf.device)
                weights.diagonal().zero_()  # exclude j = i
            k_xz, g_xz = _value_and_grad(kernel, xf, z, xc, zc, weights)
            k_xy, g_xy = _value_and_grad(kernel, xf, y, xc, yc)
            s_xx = k_xz[:, :n].sum()
            s_zz, t_z, s_zy = 2.0 * k_xz.sum() - s_xx, k_xz[:, :n].diagonal().sum(), k_xy.sum()
            if mem is not None:
                stats = mem[2]
                s_zz, t_z, s_zy = s_zz + stats["sum_mm"], t_z + stats["trace_mm"], s_zy + stats["sum_my"]
            value = self._combine(s_zz, t_z, s_zy, yy, big_n, m)
            c_xz = 2.0 / (big_n * (big_n - 1)) if self.unbiased else 2.0 / big_n**2
            attraction = (2.0 / (big_n * m)) * g_xy
            g = c_xz * g_xz - attraction
            return g.reshape(x.shape), (-attraction).reshape(x.shape) if split else None, value

    def contributions(self, x: Tensor, x_cond: Tensor | None = None) -> Tensor:
        """Exact leave-one-out Δ_i = MMD²(X) − MMD²(X∖{x_i}), shape [n]; see :func:`mmd_contributions`."""
        with torch.no_grad():
            xf, xc = self._prepare(x.detach(), x_cond)
            _check_count(
                xf.shape[0],
                3 if self.unbiased else 2,
                "x",
                "leave-one-out contributions with " + _estimator(self.unbiased),
            )
            if isinstance(self.kernel, RandomFourierFeatures):
                sy = self._y_feature_sum.to(xf.dtype)
                return _contributions_from_features(self.kernel, xf, sy, self.num_references, self.unbiased)
            y, yc, _ = self._reference(xf.dtype)
            return _contributions_from_blocks(self.kernel, xf, xc, y, yc, self.unbiased)

    def __repr__(self) -> str:
        return (
            f"MMDTarget(num_references={self.num_references}, dim={self.dim}, kernel={self.kernel!r}, "
            f"unbiased={self.unbiased})"
        )
