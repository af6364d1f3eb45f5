"""Evaluation metrics as pure functions on feature tensors ``[n, F]`` (no I/O, no models).

Conventions: ``x`` are generated samples [n, F], ``y`` references [m, F] (anything with more than two
dimensions is flattened per sample). The math runs in float64. Every function returns plain Python
numbers in a dict (JSON-ready) with a ``warnings`` list saying where the number is unreliable at this
sample size; :func:`memorisation` also returns per-sample tensors for plots.

MMD² and KID are computed by the project's one MMD implementation (:func:`guidance.mmd2`).
"""

from __future__ import annotations

import math
import warnings as _warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from guidance import CubicPolynomialKernel, RBFKernel, mmd2
from guidance.kernels import median_pairwise_distance, squared_distances

__all__ = [
    "MemorisationResult",
    "class_accuracy",
    "class_histogram",
    "filter_score_summary",
    "garbage",
    "frechet_distance",
    "frechet_distance_from_stats",
    "kid",
    "knn_predict",
    "memorisation",
    "mmd2_permutation_test",
    "nearest_neighbour_distances",
    "pairwise_distances",
    "prdc",
    "score_summary",
]

_BALL_TOL = 1e-9

#: Below this many permutations the p-value resolution (1/(P+1)) is too coarse to mean much.
MIN_PERMUTATIONS = 200


def as_features(x: Tensor | np.ndarray, name: str = "x") -> Tensor:
    """float64 [n, F] on the CPU (flattened per sample); refuses NaN/inf."""
    t = torch.as_tensor(x).detach().cpu()
    if t.dim() == 0:
        raise ValueError(f"{name} must have a sample dimension, got a scalar")
    t = t.reshape(t.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return t


def _check_pair(x: Tensor, y: Tensor, min_count: int, purpose: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{purpose}: x has {x.shape[1]} features per sample but y has {y.shape[1]}")
    for name, t in (("x", x), ("y", y)):
        if t.shape[0] < min_count:
            raise ValueError(f"{purpose} needs at least {min_count} samples in {name}, got {t.shape[0]}")


def pairwise_distances(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances ‖x_i − y_j‖, float64 [n, m]."""
    return squared_distances(as_features(x, "x"), as_features(y, "y")).sqrt()


def _self_distances(x: Tensor) -> Tensor:
    """‖x_i − x_j‖ with +inf on the diagonal (a point is not its own neighbour)."""
    d = pairwise_distances(x, x)
    d.fill_diagonal_(math.inf)
    return d


def nearest_neighbour_distances(x: Tensor, k: int = 1) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest *other* row, float64 [n]."""
    x = as_features(x)
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} samples, got {k}")
    return _self_distances(x).kthvalue(k, dim=1).values


def _quantile(t: Tensor, q: float) -> float:
    return float(torch.quantile(t.to(torch.float64), q)) if t.numel() else math.nan


# --------------------------------------------------------------------------------------------------------
# MMD² with a permutation test, KID
# --------------------------------------------------------------------------------------------------------


def mmd2_permutation_test(
    x: Tensor,
    y: Tensor,
    *,
    bandwidth: float | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
    chunk: int = 64,
) -> dict[str, Any]:
    """Unbiased MMD² with a Gaussian RBF kernel and its permutation-test p-value.

    The statistic is :func:`guidance.mmd2` (U-statistic, Gretton et al. 2012, JMLR, eq. 3) with
    σ = median pairwise distance of the references ``y`` (median heuristic; pass ``bandwidth`` to fix it).
    The null distribution comes from ``n_permutations`` random relabellings of the pooled sample (the
    same kernel's pooled gram matrix, re-summed per permutation); p = (1 + #{null ≥ observed}) / (1 + P)
    (Phipson & Smyth 2010), so p is never 0 and its resolution is 1/(P + 1).
    """
    x, y = as_features(x, "x"), as_features(y, "y")
    _check_pair(x, y, 2, "MMD² (unbiased)")
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    sigma = float(bandwidth) if bandwidth is not None else median_pairwise_distance(y)
    kernel = RBFKernel(sigma)
    observed = float(mmd2(x, y, kernel, unbiased=True))
    n, m = x.shape[0], y.shape[0]
    big_n = n + m
    gram = kernel.matrix(torch.cat([x, y]), torch.cat([x, y]))  # pooled [N, N], float64
    diag = gram.diagonal().clone()
    rows = gram.sum(1)
    total, trace = rows.sum(), diag.sum()

    def statistic(a: Tensor) -> Tensor:
        """MMD²_U for each row of the 0/1 indicator ``a`` [P, N] of the X group, from the pooled gram."""
        s_xx = ((a @ gram) * a).sum(1)  # Σ_{i,j∈X} K_ij
        r_x = a @ rows  # Σ_{i∈X} Σ_j K_ij
        s_xy = r_x - s_xx
        s_yy = total - 2.0 * r_x + s_xx
        t_x = a @ diag
        # MMD²_U = Σ_{i≠j∈X} K/(n(n−1)) + Σ_{r≠s∈Y} K/(m(m−1)) − 2 Σ_{X×Y} K/(nm)
        return (s_xx - t_x) / (n * (n - 1)) + (s_yy - (trace - t_x)) / (m * (m - 1)) - 2.0 * s_xy / (n * m)

    identity = torch.zeros(1, big_n, dtype=torch.float64)
    identity[0, :n] = 1.0
    check = float(statistic(identity)[0])
    if not math.isclose(check, observed, rel_tol=1e-6, abs_tol=1e-9):  # the re-summing must equal guidance.mmd2
        raise RuntimeError(f"permutation statistic {check} disagrees with guidance.mmd2 {observed}")

    generator = torch.Generator().manual_seed(int(seed))
    null: list[Tensor] = []
    for start in range(0, n_permutations, chunk):
        p = min(chunk, n_permutations - start)
        order = torch.argsort(torch.rand(p, big_n, generator=generator, dtype=torch.float64), dim=1)
        a = torch.zeros(p, big_n, dtype=torch.float64)
        a.scatter_(1, order[:, :n], 1.0)
        null.append(statistic(a))
    null_t = torch.cat(null) if null else torch.zeros(0, dtype=torch.float64)
    exceed = int((null_t >= observed - 1e-12 * max(1.0, abs(observed))).sum())
    p_value = (1 + exceed) / (1 + n_permutations)
    warns = []
    if n_permutations < MIN_PERMUTATIONS:
        warns.append(
            f"MMD² p-value from only {n_permutations} permutations: its resolution is "
            f"{1 / (n_permutations + 1):.3g}; use at least {MIN_PERMUTATIONS}"
        )
    if min(n, m) < 20:
        warns.append(f"MMD² test with {min(n, m)} samples on one side has little power: a large p is not evidence")
    return {
        "mmd2": observed,
        "p_value": p_value,
        "n_permutations": int(n_permutations),
        "null_mean": float(null_t.mean()) if null_t.numel() else math.nan,
        "null_std": float(null_t.std()) if null_t.numel() > 1 else math.nan,
        "bandwidth": sigma,
        "n": n,
        "m": m,
        "warnings": warns,
    }


def kid(
    x: Tensor,
    y: Tensor,
    *,
    subset_size: int | None = None,
    n_subsets: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Kernel Inception Distance in any feature space (Bińkowski et al. 2018, "Demystifying MMD GANs").

    Unbiased MMD² (:func:`guidance.mmd2`) with the cubic kernel k(x, y) = (xᵀy/d + 1)³, averaged over
    ``n_subsets`` random subsets (without replacement) of ``subset_size`` samples from each side; the std
    over subsets is the spread of the estimate at that subset size. The default subset size is
    min(1000, ⌊n/2⌋, ⌊m/2⌋): at most 1000 as in the paper, and smaller than either set, so that the
    subsets differ and the spread means something at small N.
    """
    x, y = as_features(x, "x"), as_features(y, "y")
    _check_pair(x, y, 2, "KID")
    n, m = x.shape[0], y.shape[0]
    warns = []
    if subset_size is None:
        size = max(2, min(1000, n // 2, m // 2))
    else:
        size = int(subset_size)
        if size < 2:
            raise ValueError(f"subset_size must be at least 2, got {size}")
    if size > min(n, m):
        warns.append(f"KID subset size {size} lowered to the smaller set's size {min(n, m)}")
        size = min(n, m)
    if size >= min(n, m) and n == m:
        warns.append("KID subsets are the whole sets: the std over subsets is 0 and says nothing about error")
    if size < 50:
        warns.append(f"KID from subsets of {size} samples: unbiased but noisy (see kid_std)")
    kernel = CubicPolynomialKernel()
    generator = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(int(n_subsets)):
        ix = torch.randperm(n, generator=generator)[:size]
        iy = torch.randperm(m, generator=generator)[:size]
        values.append(float(mmd2(x[ix], y[iy], kernel, unbiased=True)))  # KID = MMD²_U, cubic kernel
    v = torch.tensor(values, dtype=torch.float64)
    return {
        "kid": float(v.mean()),
        "kid_std": float(v.std()) if len(values) > 1 else math.nan,
        "subset_size": size,
        "n_subsets": int(n_subsets),
        "n": n,
        "m": m,
        "warnings": warns,
    }


# --------------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------------


def frechet_distance_from_stats(
    mu1: Tensor | np.ndarray,
    sigma1: Tensor | np.ndarray,
    mu2: Tensor | np.ndarray,
    sigma2: Tensor | np.ndarray,
    *,
    method: str = "eigh",
) -> tuple[float, list[str]]:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, eq. 6; Dowson & Landau 1982):

        d² = ‖μ1 − μ2‖² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1 Σ2)^{1/2})

    Returns (d², warnings). ``method`` computes Tr((Σ1Σ2)^{1/2}):
    - "eigh" (default): Σ1Σ2 is similar to the PSD matrix Σ1^{1/2} Σ2 Σ1^{1/2}, so the trace is Σ √λ_i
      of that symmetric matrix (two symmetric eigendecompositions: real, stable on singular covariances);
    - "sqrtm": ``scipy.linalg.sqrtm(Σ1 Σ2)`` as pytorch-fid does: ε·I added to both covariances when the
      result is not finite, imaginary round-off dropped (with a warning when it is not tiny).
    Both give the same number to round-off; values below 0 from round-off are clipped to 0.
    """
    mu1, mu2 = (torch.as_tensor(v).detach().cpu().double().numpy().ravel() for v in (mu1, mu2))
    s1, s2 = (np.atleast_2d(torch.as_tensor(v).detach().cpu().double().numpy()) for v in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    warns: list[str] = []
    diff = mu1 - mu2
    if method == "eigh":
        s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
        w1, v1 = np.linalg.eigh(s1)
        root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T  # Σ1^{1/2}
        middle = root1 @ s2 @ root1
        lam = np.linalg.eigvalsh((middle + middle.T) / 2)
        tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    elif method == "sqrtm":
        from scipy import linalg

        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")  # scipy warns on singular input; handled below
            covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            eps = 1e-6
            warns.append(f"Fréchet distance: singular covariance product, added {eps:g}·I to both covariances")
            offset = np.eye(s1.shape[0]) * eps
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            imag = float(np.max(np.abs(np.diagonal(covmean).imag))) if covmean.size else 0.0
            scale = max(1.0, float(np.max(np.abs(covmean.real))) if covmean.size else 1.0)
            if imag > 1e-3 * scale:
                warns.append(f"Fréchet distance: matrix square root has an imaginary part up to {imag:.3g}; dropped")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0), warns


#: Above this feature dimension the d×d covariances are not formed (memory, and n ≪ d anyway).
MAX_FD_DIM = 4096


def frechet_distance(x: Tensor, y: Tensor, *, method: str = "eigh") -> dict[str, Any]:
    """Fréchet distance between Gaussians fitted to ``x`` and ``y`` (FID's formula in this feature space).

    Biased at small n (it grows as n shrinks) and ill-conditioned when n < F: warns when either set has
    fewer than 2 × F samples. Refuses more than ``MAX_FD_DIM`` features (use a lower-dimensional
    feature space).
    """
    x, y = as_features(x, "x"), as_features(y, "y")
    _check_pair(x, y, 2, "Fréchet distance")
    dim = x.shape[1]
    if dim > MAX_FD_DIM:
        raise ValueError(
            f"Fréchet distance in {dim} dimensions (> {MAX_FD_DIM}) is not computed: use a smaller feature space"
        )
    n, m = x.shape[0], y.shape[0]
    warns = []
    if min(n, m) < 2 * dim:
        warns.append(
            f"Fréchet distance with {min(n, m)} samples in {dim} dimensions (< 2 × dim): covariances are "
            "rank-deficient and the value is strongly biased upward; compare only at equal n, prefer KID"
        )
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = torch.cov(x.T).reshape(dim, dim), torch.cov(y.T).reshape(dim, dim)
    value, more = frechet_distance_from_stats(mu1, s1, mu2, s2, method=method)
    return {"fd": value, "dim": dim, "n": n, "m": m, "method": method, "warnings": warns + more}


# --------------------------------------------------------------------------------------------------------


def prdc(x: Tensor, y: Tensor, *, k: int = 5, masks: bool = False) -> dict[str, Any]:
    """Precision, recall, density and coverage (Naeem et al. 2020, eqs. 1-4) of samples ``x`` against
    references ``y``, with k-nearest-neighbour balls B(p, NND_k(p)) (closed balls, distance ≤ radius):

    - precision: fraction of samples inside some reference ball (fidelity);
    - recall: fraction of references inside some sample ball (diversity);
    - density: (1 / (k n)) Σ_samples #{reference balls containing it} (≈ 1 when x ~ y; can exceed 1);
    - coverage: fraction of references whose ball contains at least one sample.

    `masks`: also return "in_ball" [n] bool (sample i inside some reference ball: precision's indicator) and
    "hits" [n, m] bool (sample i inside reference j's ball: coverage is the share of columns with a hit), for
    statistics of subsets or reweighted samples (the pilot's bootstrap).
    """
    x, y = as_features(x, "x"), as_features(y, "y")
    n, m = x.shape[0], y.shape[0]
    _check_pair(x, y, k + 1, f"precision/recall/density/coverage with k={k}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # NND_k of each reference [m] / sample [n]; widened by 1e-9 (relative) so that a point at exactly the
    # radius counts as inside whatever the round-off of the two distance computations
    ref_radius = _self_distances(y).kthvalue(k, dim=1).values * (1 + _BALL_TOL)
    sample_radius = _self_distances(x).kthvalue(k, dim=1).values * (1 + _BALL_TOL)
    d = pairwise_distances(x, y)  # [n, m]
    in_ref_ball = d <= ref_radius.unsqueeze(0)  # sample i inside reference j's ball
    precision = float(in_ref_ball.any(1).double().mean())
    recall = float((d <= sample_radius.unsqueeze(1)).any(0).double().mean())
    density = float(in_ref_ball.sum(1).double().mean() / k)
    coverage = float((d.min(0).values <= ref_radius).double().mean())
    warns = []
    if min(n, m) < 10 * k:
        warns.append(
            f"precision/recall/density/coverage with {min(n, m)} samples on one side and k={k} (< 10 × k): "
            "the k-NN balls are large and the values are coarse"
        )
    out = {
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        "k": k,
        "n": n,
        "m": m,
        "warnings": warns,
    }
    if masks:
        out["in_ball"], out["hits"] = in_ref_ball.any(1), in_ref_ball
    return out


# --------------------------------------------------------------------------------------------------------
# Memorisation
# --------------------------------------------------------------------------------------------------------


@dataclass
class MemorisationResult:
    """Nearest-reference distances of samples against the references' own nearest-neighbour distances.

    Rule: sample i is a near-copy when d_i = min_r ‖x_i − y_r‖ < ``copy_ratio`` × median_r(min_{s≠r}
    ‖y_r − y_s‖), i.e. it is closer to some reference than references typically are to each other by a
    factor 1/copy_ratio. ``relative`` is d_i / (that reference's own NN distance), a local version.
    """

    sample_nn_distance: Tensor  # [n] d_i
    nearest_reference: Tensor  # [n] argmin_r
    reference_nn_distance: Tensor  # [m] min_{s≠r} ‖y_r − y_s‖
    is_copy: Tensor  # [n] bool
    threshold: float
    copy_ratio: float
    warnings: list[str] = field(default_factory=list)

    @property
    def relative(self) -> Tensor:
        own = self.reference_nn_distance[self.nearest_reference]
        return self.sample_nn_distance / own.clamp_min(1e-12)

    def summary(self) -> dict[str, Any]:
        d, r = self.sample_nn_distance, self.reference_nn_distance
        copies = self.is_copy
        return {
            "rule": (
                "near-copy if distance to the nearest reference < copy_ratio × median nearest-neighbour "
                "distance among the references"
            ),
            "copy_ratio": self.copy_ratio,
            "threshold": self.threshold,
            "num_copies": int(copies.sum()),
            "fraction_copies": float(copies.double().mean()) if copies.numel() else math.nan,
            "copied_references": sorted({int(i) for i in self.nearest_reference[copies].tolist()}),
            "sample_nn_median": _quantile(d, 0.5),
            "sample_nn_min": float(d.min()) if d.numel() else math.nan,
            "sample_nn_q05": _quantile(d, 0.05),
            "reference_nn_median": _quantile(r, 0.5),
            "reference_nn_q05": _quantile(r, 0.05),
            "relative_median": _quantile(self.relative, 0.5),
            "relative_min": float(self.relative.min()) if d.numel() else math.nan,
            "n": int(d.numel()),
            "m": int(r.numel()),
            "warnings": list(self.warnings),
        }


def memorisation(x: Tensor, y: Tensor, *, copy_ratio: float = 0.5) -> MemorisationResult:
    """Flag samples ``x`` that are near-copies of references ``y`` (rule in :class:`MemorisationResult`;
    nearest-neighbour copy checks as in Carlini et al. 2023 and, for chest X-ray LDMs, arXiv 2402.01054)."""
    x, y = as_features(x, "x"), as_features(y, "y")
    _check_pair(x, y, 1, "memorisation")
    if y.shape[0] < 2:
        raise ValueError("memorisation needs at least 2 references (their own nearest-neighbour distances)")
    if not copy_ratio > 0:
        raise ValueError(f"copy_ratio must be positive, got {copy_ratio}")
    dist, idx = pairwise_distances(x, y).min(1)
    ref_nn = _self_distances(y).min(1).values
    threshold = float(copy_ratio) * _quantile(ref_nn, 0.5)
    warns = []
    if int((ref_nn == 0).sum()):
        warns.append(f"{int((ref_nn == 0).sum())} references have an exact duplicate among the references")
    if y.shape[0] < 20:
        warns.append(f"memorisation threshold from only {y.shape[0]} references' nearest-neighbour distances")
    return MemorisationResult(dist, idx, ref_nn, dist < threshold, threshold, float(copy_ratio), warns)


# --------------------------------------------------------------------------------------------------------
# Class accuracy, filter scores
# --------------------------------------------------------------------------------------------------------


def knn_predict(x: Tensor, y: Tensor, y_labels: Tensor, *, k: int = 5) -> Tensor:
    """Majority label among the k nearest references of each sample (ties: the nearer neighbours win)."""
    x, y = as_features(x, "x"), as_features(y, "y")
    labels = torch.as_tensor(y_labels).long().cpu()
    if labels.shape != (y.shape[0],):
        raise ValueError(f"y_labels must have shape ({y.shape[0]},), got {tuple(labels.shape)}")
    k = min(k, y.shape[0])
    order = pairwise_distances(x, y).topk(k, dim=1, largest=False).indices  # nearest first
    neigh = labels[order]  # [n, k]
    num = int(labels.max()) + 1 if labels.numel() else 1
    votes = torch.zeros(x.shape[0], num, dtype=torch.float64)
    weight = 1.0 + torch.linspace(1e-3, 0.0, k, dtype=torch.float64)  # tiny tie-break by rank
    votes.scatter_add_(1, neigh, weight.expand(x.shape[0], k).contiguous())
    return votes.argmax(1)


def class_accuracy(
    predicted: Tensor, target: Tensor, class_names: list[str] | None = None, *, ignore: int = -1
) -> dict[str, Any]:
    """Fraction of samples whose predicted class equals the intended one, overall and per class.

    Rows whose target equals ``ignore`` are left out.
    """
    pred = torch.as_tensor(predicted).long().cpu().ravel()
    tgt = torch.as_tensor(target).long().cpu().ravel()
    if pred.shape != tgt.shape:
        raise ValueError(f"predicted has {pred.numel()} entries but target has {tgt.numel()}")
    use = tgt != ignore
    pred, tgt = pred[use], tgt[use]
    per_class = {}
    for c in sorted(set(tgt.tolist())):
        members = tgt == c
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        per_class[name] = {"n": int(members.sum()), "accuracy": float((pred[members] == c).double().mean())}
    warns = [
        f"class accuracy of class {name} from only {v['n']} samples" for name, v in per_class.items() if v["n"] < 10
    ]
    return {
        "accuracy": float((pred == tgt).double().mean()) if tgt.numel() else math.nan,
        "n": int(tgt.numel()),
        "per_class": per_class,
        "warnings": warns,
    }


def score_summary(scores: Tensor | np.ndarray) -> dict[str, float]:
    """count, mean, std, min, 5/25/50/75/95 % quantiles and max of a 1-D set of scores."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).ravel()
    if s.numel() == 0:
        return {"count": 0}
    out = {"count": int(s.numel()), "mean": float(s.mean()), "std": float(s.std()) if s.numel() > 1 else 0.0}
    out["min"] = float(s.min())
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        out[f"q{round(q * 100):02d}"] = _quantile(s, q)
    out["max"] = float(s.max())
    return out


def filter_score_summary(scores: Tensor | np.ndarray, kept: Tensor | np.ndarray) -> dict[str, Any]:
    """The filter's score (per-sample leave-one-out MMD² contribution; lower = helps alignment)
    distribution for kept vs rejected samples."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    k = np.asarray(kept, dtype=bool).ravel()
    if s.shape != k.shape:
        raise ValueError(f"scores has {s.size} entries but kept has {k.size}")
    return {
        "kept": score_summary(s[k]),
        "rejected": score_summary(s[~k]),
        "keep_fraction": float(k.mean()) if k.size else math.nan,
        "num_generated": int(k.size),
    }


# --------------------------------------------------------------------------------------------------------
# Garbage, class histograms
# --------------------------------------------------------------------------------------------------------


def garbage(x: Tensor, real: Tensor) -> dict[str, Any]:
    """Samples that are no image of any real kind: farther from every real image than *every* real image
    is from its nearest other real image (threshold: the largest leave-one-out nearest-neighbour distance
    of ``real``, so real data itself scores 0). ``real`` should pool every style a sample may fairly take
    (the target domain's images and the prior's own), so only images of neither kind count.

    Returns {"rate", "count", "n", "threshold", "mask" (list of bool)}.
    """
    x, real = as_features(x, "x"), as_features(real, "real")
    _check_pair(x, real, 1, "garbage rate")
    if real.shape[0] < 2:
        raise ValueError("garbage rate needs at least 2 real images (their own nearest-neighbour distances)")
    threshold = float(_self_distances(real).min(1).values.max())
    mask = pairwise_distances(x, real).min(1).values > threshold
    return {
        "rate": float(mask.double().mean()),
        "count": int(mask.sum()),
        "n": int(x.shape[0]),
        "threshold": threshold,
        "mask": mask.tolist(),
    }


def class_histogram(labels: Tensor | np.ndarray, planned: Tensor | np.ndarray) -> dict[str, Any]:
    """Counts and shares of class ids ``labels`` (−1 or out of range: "other") against planned proportions
    [K]; ``max_deviation`` is the largest |share − planned| over the classes (and "other"), in [0, 1]."""
    p = torch.as_tensor(np.asarray(planned, dtype=np.float64))
    k = len(p)
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64)).ravel()
    other = (lab < 0) | (lab >= k)
    counts = torch.bincount(lab[~other], minlength=k).double()
    n = max(int(lab.numel()), 1)
    share = counts / n
    deviation = torch.cat([(share - p).abs(), torch.tensor([float(other.sum()) / n], dtype=torch.float64)])
    return {
        "counts": [int(c) for c in counts],
        "other": int(other.sum()),
        "shares": share.tolist(),
        "planned": p.tolist(),
        "max_deviation": float(deviation.max()) if lab.numel() else math.nan,
    }
