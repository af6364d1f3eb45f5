"""Evaluation metrics against known values: identical sets, shifted Gaussians with closed forms, planted copies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guidance import CubicPolynomialKernel, RBFKernel, mmd2
from pipeline.measures.metrics import (
    class_accuracy,
    filter_score_summary,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    knn_predict,
    memorisation,
    mmd2_permutation_test,
    nearest_neighbour_distances,
    prdc,
    score_summary,
)


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) + shift


def random_covariance(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def closed_form_fd(mu1, s1, mu2, s2) -> float:
    # ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}) (the trace equals that of (Σ1Σ2)^{1/2})
    r1 = psd_sqrt(s1)
    cross = psd_sqrt(r1 @ s2 @ r1)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1 + s2 - 2 * cross))


# ---------------------------------------------------------------------------------------------- identical sets


def test_identical_sets_give_zero_distances_and_full_precision_recall():
    x = gaussian(200, 6, seed=0)
    test = mmd2_permutation_test(x, x.clone(), n_permutations=300, seed=0)
    assert abs(test["mmd2"]) < 0.01 and test["p_value"] > 0.5
    assert frechet_distance(x, x.clone())["fd"] == pytest.approx(0.0, abs=1e-9)
    scores = prdc(x, x.clone(), k=5)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    # each point lies in its own ball (distance 0) and in the balls of the k references it is a k-NN of
    assert scores["density"] == pytest.approx(6 / 5)


def test_permutation_test_uses_guidance_mmd2_and_is_seeded():
    x, y = gaussian(40, 5, seed=1), gaussian(30, 5, seed=2, shift=0.3)
    a = mmd2_permutation_test(x, y, n_permutations=100, seed=3)
    b = mmd2_permutation_test(x, y, n_permutations=100, seed=3)
    assert a == b
    kernel = RBFKernel(a["bandwidth"])
    assert a["mmd2"] == pytest.approx(float(mmd2(x, y, kernel, unbiased=True)), rel=1e-12)
    assert 1 / 101 <= a["p_value"] <= 1.0
    assert any("resolution" in w for w in a["warnings"])  # 100 < MIN_PERMUTATIONS


def test_permutation_p_value_small_for_different_sets_and_not_for_same_distribution():
    x = gaussian(100, 8, seed=4)
    shifted = mmd2_permutation_test(x, gaussian(100, 8, seed=5, shift=1.0), n_permutations=300, seed=0)
    assert shifted["p_value"] == pytest.approx(1 / 301)  # no permutation reaches the observed value
    assert shifted["mmd2"] > 10 * shifted["null_std"]
    same = mmd2_permutation_test(x, gaussian(100, 8, seed=6), n_permutations=300, seed=0)
    assert same["p_value"] > 0.05


# ---------------------------------------------------------------------------------------------- KID


def test_kid_is_unbiased_mmd2_with_the_cubic_kernel():
    x, y = gaussian(30, 4, seed=7), gaussian(30, 4, seed=8, shift=0.5)
    whole = kid(x, y, subset_size=30, n_subsets=3)
    assert whole["kid"] == pytest.approx(float(mmd2(x, y, CubicPolynomialKernel(), unbiased=True)), rel=1e-12)
    assert whole["kid_std"] == pytest.approx(0.0, abs=1e-12) and any("whole sets" in w for w in whole["warnings"])


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted():
    x = gaussian(300, 8, seed=9)
    same = kid(x, gaussian(300, 8, seed=10), n_subsets=30, seed=0)
    shifted = kid(x, gaussian(300, 8, seed=11, shift=0.5), n_subsets=30, seed=0)
    assert same["subset_size"] == 150  # below n: subsets differ, the spread means something
    assert abs(same["kid"]) < 2 * same["kid_std"] and abs(same["kid"]) < 0.05 * shifted["kid"]
    assert shifted["kid"] > 5 * shifted["kid_std"]
    # unbiased: over independent pairs of same-distribution samples the mean is ~0 (within 3 standard errors)
    means = [kid(gaussian(40, 4, seed=100 + i), gaussian(40, 4, seed=200 + i), n_subsets=3)["kid"] for i in range(30)]
    assert abs(np.mean(means)) < 3 * np.std(means) / math.sqrt(len(means))


def test_kid_small_sets_use_subsets_below_n():
    out = kid(gaussian(10, 3, seed=1), gaussian(7, 3, seed=2), n_subsets=4)
    assert out["subset_size"] == 3 and any("noisy" in w for w in out["warnings"])


# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_from_stats_matches_closed_form_both_methods():
    dim = 5
    mu1, mu2 = torch.zeros(dim, dtype=torch.float64), torch.linspace(0, 1, dim, dtype=torch.float64)
    s1, s2 = random_covariance(dim, 0), random_covariance(dim, 1)  # do not commute
    expected = closed_form_fd(mu1, s1, mu2, s2)
    for method in ("eigh", "sqrtm"):
        value, warns = frechet_distance_from_stats(mu1, s1, mu2, s2, method=method)
        assert value == pytest.approx(expected, rel=1e-8) and warns == []
    # diagonal covariances: ‖μ1 − μ2‖² + Σ (σ1_i − σ2_i)²
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    value, _ = frechet_distance_from_stats(torch.zeros(3), torch.diag(d1), torch.ones(3), torch.diag(d2))
    assert value == pytest.approx(3 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2)


def test_frechet_distance_of_shifted_gaussians_converges_to_closed_form():
    dim, n = 4, 20000
    s1, s2 = random_covariance(dim, 2), random_covariance(dim, 3)
    mu1, mu2 = torch.zeros(dim, dtype=torch.float64), torch.full((dim,), 0.5, dtype=torch.float64)
    x = gaussian(n, dim, seed=12) @ psd_sqrt(s1) + mu1
    y = gaussian(n, dim, seed=13) @ psd_sqrt(s2) + mu2
    out = frechet_distance(x, y)
    assert out["fd"] == pytest.approx(closed_form_fd(mu1, s1, mu2, s2), rel=0.05)
    assert out["warnings"] == []


def test_frechet_distance_warns_when_n_is_small_for_the_dimension():
    out = frechet_distance(gaussian(20, 16, seed=1), gaussian(20, 16, seed=2))
    assert out["fd"] > 0 and any("< 2 × dim" in w for w in out["warnings"])
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(torch.zeros(3, 5000), torch.ones(3, 5000))


# ---------------------------------------------------------------------------------------------- PRDC


def test_prdc_mode_dropping_keeps_precision_but_loses_coverage():
    y = gaussian(300, 4, seed=14)
    half = y[y[:, 0] > 0]  # samples cover only one half of the references
    out = prdc(half + 1e-3, y, k=5)
    assert out["precision"] == 1.0
    assert out["coverage"] < 0.75 and out["recall"] < 0.9
    far = prdc(gaussian(100, 4, seed=15, shift=6.0), y, k=5)
    assert far["precision"] == 0.0 and far["coverage"] == 0.0 and far["density"] == 0.0
    assert any("10 × k" in w for w in prdc(y[:20], y[:30], k=5)["warnings"])


# ---------------------------------------------------------------------------------------------- memorisation


def test_memorisation_flags_planted_copies():
    refs = gaussian(200, 16, seed=16)
    fresh = gaussian(60, 16, seed=17)
    planted = [3, 50, 51, 120, 199]
    copies = refs[planted] + 1e-3 * gaussian(len(planted), 16, seed=18)
    samples = torch.cat([fresh, copies])
    res = memorisation(samples, refs, copy_ratio=0.5)
    assert res.is_copy.nonzero().flatten().tolist() == list(range(60, 65))
    summary = res.summary()
    assert summary["num_copies"] == 5 and summary["copied_references"] == planted
    assert summary["threshold"] == pytest.approx(0.5 * float(res.reference_nn_distance.median()), rel=0.02)
    assert res.relative[:60].min() > 0.5 and res.relative[60:].max() < 0.01
    assert torch.equal(res.reference_nn_distance, nearest_neighbour_distances(refs, k=1))


# ---------------------------------------------------------------------------------------------- classes, scores


def test_knn_predict_and_class_accuracy():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    refs = torch.cat([c + 0.5 * gaussian(20, 2, seed=i) for i, c in enumerate(centres)])
    ref_labels = torch.arange(3).repeat_interleave(20)
    samples = torch.stack([centres[0] + 0.1, centres[1] + 0.1, centres[2] + 0.1, centres[2] - 0.1])
    pred = knn_predict(samples, refs, ref_labels, k=5)
    assert pred.tolist() == [0, 1, 2, 2]
    acc = class_accuracy(pred, torch.tensor([0, 1, 1, -1]), ["a", "b", "c"])
    assert acc["accuracy"] == pytest.approx(2 / 3) and acc["n"] == 3
    assert acc["per_class"] == {"a": {"n": 1, "accuracy": 1.0}, "b": {"n": 2, "accuracy": 0.5}}


def test_filter_score_summary_splits_kept_and_rejected():
    scores = np.arange(10, dtype=float)
    out = filter_score_summary(scores, scores < 7)
    assert out["kept"]["count"] == 7 and out["rejected"]["count"] == 3
    assert out["kept"]["max"] == 6 and out["rejected"]["min"] == 7 and out["keep_fraction"] == 0.7
    assert score_summary([])["count"] == 0
    assert score_summary(np.array([1.0, 3.0]))["q50"] == 2.0
