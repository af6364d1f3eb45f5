"""The shard summary's MMD² (pool and kept set) against a plain double loop, with blown-up samples in the pool.

Guided runs of the shipped prior produce a few latents of norm ~1e8. They once made the summary print a
negative MMD² (the kernel centred both sets on the mean of the generated set, dragged far out by those
samples, and float32 cancellation then zeroed every kernel value, the diagonal included).
"""

from __future__ import annotations

import math

import pytest
import torch

from guidance import DeltaKernel, ProductKernel, RBFKernel, mmd_contributions
from guidance.kernels import squared_distances
from pipeline.checks.reference import ReferenceBundle
from pipeline.jobs.worker import mmd2_to_references

BANDWIDTH = 8.0


def _pool_and_references() -> tuple[torch.Tensor, torch.Tensor, ReferenceBundle]:
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(16, 2, 4, 4, generator=g)
    ref_labels = torch.arange(16) % 3
    pool = torch.randn(12, 2, 4, 4, generator=g) + 0.3
    pool[2] *= 1e6  # blown-up samples, as guided runs produce them
    pool[7] *= 5e7
    pool[9] *= 3e5
    labels = torch.arange(12) % 3
    bundle = ReferenceBundle(
        latents=refs,
        labels=ref_labels,
        class_names=["a", "b", "c"],
        bandwidth=BANDWIDTH,
        content_hash="h",
        model_id="m",
        files=[],
    )
    return pool, labels, bundle


def _double_loop_mmd2(x: torch.Tensor, cx: torch.Tensor, y: torch.Tensor, cy: torch.Tensor) -> float:
    """MMD²_V = mean k(X,X) + mean k(Y,Y) − 2 mean k(X,Y), one pair at a time in float64 (Python floats)."""
    xs = [row.double() for row in x.flatten(1)]
    ys = [row.double() for row in y.flatten(1)]

    def k(a: torch.Tensor, ca: int, b: torch.Tensor, cb: int) -> float:
        if ca != cb:
            return 0.0
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * BANDWIDTH**2))

    n, m = len(xs), len(ys)
    xx = sum(k(xs[i], int(cx[i]), xs[j], int(cx[j])) for i in range(n) for j in range(n)) / n**2
    yy = sum(k(ys[r], int(cy[r]), ys[s], int(cy[s])) for r in range(m) for s in range(m)) / m**2
    xy = sum(k(xs[i], int(cx[i]), ys[r], int(cy[r])) for i in range(n) for r in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_summary_mmd2_equals_the_double_loop_and_is_not_negative():
    pool, labels, bundle = _pool_and_references()
    kernel = ProductKernel(RBFKernel(BANDWIDTH), DeltaKernel())
    expected = _double_loop_mmd2(pool, labels, bundle.latents, bundle.labels)
    got = mmd2_to_references(pool, labels, bundle, kernel)
    assert got >= 0
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    sub = slice(0, 6)
    assert mmd2_to_references(pool[sub], labels[sub], bundle, kernel) == pytest.approx(
        _double_loop_mmd2(pool[sub], labels[sub], bundle.latents, bundle.labels), rel=1e-9
    )


def test_summary_of_a_plain_kernel_equals_the_double_loop():
    pool, _, bundle = _pool_and_references()
    same_class = torch.zeros(len(pool), dtype=torch.long)
    expected = _double_loop_mmd2(pool, same_class, bundle.latents, torch.zeros(len(bundle.latents), dtype=torch.long))
    unlabelled = ReferenceBundle(**{**bundle.__dict__, "labels": None, "class_names": None})
    assert mmd2_to_references(pool, None, unlabelled, RBFKernel(BANDWIDTH)) == pytest.approx(expected, rel=1e-9)


def test_keeping_the_lowest_contributions_does_not_worsen_the_pool():
    """The filter's ranking (float32, as the worker computes it) on a pool with blown-up samples."""
    pool, labels, bundle = _pool_and_references()
    kernel = ProductKernel(RBFKernel(BANDWIDTH), DeltaKernel())
    scores = mmd_contributions(pool, bundle.latents, kernel, unbiased=True, x_cond=labels, y_cond=bundle.labels)
    kept = torch.argsort(scores.double(), stable=True)[:9]
    assert not {2, 7, 9} & set(kept.tolist())  # the blown-up samples only pull the set away
    pool_value = mmd2_to_references(pool, labels, bundle, kernel)
    kept_value = mmd2_to_references(pool[kept], labels[kept], bundle, kernel)
    assert 0 <= kept_value < pool_value


def test_squared_distances_of_a_set_with_blown_up_samples_stay_exact_in_float32():
    pool, _, _ = _pool_and_references()
    x = pool.flatten(1)
    r = squared_distances(x, x)
    exact = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    assert torch.equal(r.diagonal(), torch.zeros(len(x)))
    normal = torch.tensor([i not in (2, 7, 9) for i in range(len(x))])
    torch.testing.assert_close(r[normal][:, normal].double(), exact[normal][:, normal], rtol=1e-5, atol=1e-3)
