"""The filter: garbage is never kept, classes keep the plan's shares, reserved indices replace rejects."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import pipeline.jobs.worker as worker
from guidance import DeltaKernel, ProductKernel, RBFKernel
from pipeline.config import AugmentConfig
from pipeline.jobs.worker import extra_request, filter_shard, pool_scores, select_kept
from pipeline.plan import class_quotas, plan_job, primary_count, reserve_per_shard, reserved_index

BANDWIDTH = 1.5


def _config(**kw) -> AugmentConfig:
    base = dict(ref="r", out="o", n=40, shard_size=20, keep=0.8, strength=0.01, batch_size=8)
    base.update(kw)
    return AugmentConfig(**base)


def _context(cfg: AugmentConfig, labelled: bool, proportions=None):
    gen = torch.Generator().manual_seed(0)
    refs = torch.randn(40, 2, 2, 2, generator=gen)
    labels = torch.arange(40) % 3 if labelled else None
    kernel = ProductKernel(RBFKernel(BANDWIDTH), DeltaKernel()) if labelled else RBFKernel(BANDWIDTH)
    bundle = SimpleNamespace(
        latents=refs, labels=labels, kernel_conditions=labels, bandwidth=BANDWIDTH, class_names=["a", "b", "c"]
    )
    props = None
    if labelled:
        props = torch.tensor(proportions or [0.5, 0.3, 0.2], dtype=torch.float64)
    return SimpleNamespace(
        cfg=cfg,
        bundle=bundle,
        target=SimpleNamespace(kernel=kernel),
        proportions=props,
        judge=None,
        model=None,
        prompts=None,
        strength=0.01,
    )


def _fake_generate(garbage):
    """Latents as a pure function of the global index: `garbage(index)` ones far outside the support."""
    calls = []

    def generate(ctx, indices, labels, progress=None):
        calls.append(list(indices))
        out = []
        for i in indices:
            g = torch.Generator().manual_seed(int(i))
            x = 0.3 * torch.randn(2, 2, 2, generator=g)
            out.append(x + 500.0 if garbage(int(i)) else x)
        return torch.stack(out)

    return generate, calls


def test_reserved_indices_are_disjoint_from_primary_ones_and_deterministic():
    cfg = _config(n=2500, shard_size=1000, keep=0.75, reserve=0.5)
    plan = plan_job(cfg)
    primary = set()
    for s in plan.shards:
        primary.update(s.indices)
    assert primary_count(cfg) == plan.num_generated == len(primary)
    size = reserve_per_shard(cfg)
    assert size == 667
    reserved = [reserved_index(cfg, s.shard_id, i) for s in plan.shards for i in range(size)]
    assert len(set(reserved)) == len(reserved)  # no two shards share a reserved index
    assert not primary & set(reserved)
    again = _config(n=2500, shard_size=1000, keep=0.75, reserve=0.5)
    assert [reserved_index(again, 1, i) for i in range(5)] == reserved[size : size + 5]
    with pytest.raises(ValueError, match="outside its reserve"):
        reserved_index(cfg, 0, size)


def test_class_quotas_sum_exactly_and_follow_the_proportions():
    p = torch.tensor([0.375, 0.25, 0.25, 0.125], dtype=torch.float64)
    assert class_quotas(p, 8).tolist() == [3, 2, 2, 1]
    for n in (1, 2, 3, 7, 100, 1001):
        q = class_quotas(p, n)
        assert int(q.sum()) == n and (q - p * n).abs().max() < 1


def test_select_kept_never_keeps_an_unacceptable_sample_even_if_the_quota_goes_unfilled():
    scores = torch.tensor([5.0, -9.0, 1.0, -8.0, 2.0, -7.0])
    acceptable = torch.tensor([True, False, True, False, True, False])  # half the pool is garbage
    kept, rank = select_kept(scores, acceptable, None, torch.tensor([5]))
    assert kept.tolist() == [True, False, True, False, True, False]
    assert rank.tolist() == [2, 3, 0, 4, 1, 5]  # acceptable by score first, then the rest by position


def test_select_kept_ranks_within_each_class():
    scores = torch.tensor([0.1, 0.2, 0.3, -5.0, -4.0, 0.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    kept, _ = select_kept(scores, torch.ones(6, dtype=torch.bool), labels, torch.tensor([2, 1]))
    # a global top-3 would take three of class 1; per class: the best two of class 0, the best of class 1
    assert kept.tolist() == [True, True, False, True, False, False]


def test_extra_request_scales_by_acceptance_and_respects_the_room():
    deficit = torch.tensor([4, 0, 2])
    have, total = torch.tensor([1, 5, 0]), torch.tensor([2, 5, 4])
    assert extra_request(deficit, have, total, 100).tolist() == [8, 0, 8]  # rate 1/2; rate 0 -> at least 1/4
    assert extra_request(deficit, have, total, 10).tolist() == [8, 0, 2]


@pytest.mark.parametrize("labelled", [False, True])
def test_more_than_half_garbage_is_replaced_from_reserved_indices_and_never_kept(monkeypatch, labelled):
    cfg = _config()
    fake, calls = _fake_generate(lambda i: i < primary_count(cfg) and i % 5 < 3)  # 60% of the pool
    monkeypatch.setattr(worker, "generate_latents", fake)
    ctx = _context(cfg, labelled)
    shard = plan_job(cfg).shards[1]
    pool = filter_shard(ctx, shard)
    assert int(pool.outside[: shard.num_generated].sum()) > shard.num_generated // 2
    assert not (pool.kept & pool.outside).any()
    assert int(pool.kept.sum()) == shard.num_kept and pool.shortfall == 0
    extra = pool.indices[shard.num_generated :]
    assert extra and extra == [reserved_index(cfg, shard.shard_id, i) for i in range(len(extra))]
    assert set(extra).isdisjoint(range(primary_count(cfg)))
    if labelled:
        kept_classes = torch.bincount(pool.labels[pool.kept], minlength=3)
        assert kept_classes.tolist() == class_quotas(ctx.proportions, shard.num_kept).tolist()
    # deterministic: the same shard draws the same extra samples
    again = filter_shard(ctx, shard)
    assert again.indices == pool.indices and torch.equal(again.kept, pool.kept)


def test_a_shard_that_exhausts_its_reserve_keeps_fewer_and_warns(monkeypatch, caplog):
    cfg = _config(reserve=0.5)
    fake, calls = _fake_generate(lambda i: i % 10 < 9)  # 90% garbage everywhere
    monkeypatch.setattr(worker, "generate_latents", fake)
    ctx = _context(cfg, labelled=False)
    shard = plan_job(cfg).shards[0]
    with caplog.at_level(logging.WARNING, logger="pipeline.jobs.worker"):
        pool = filter_shard(ctx, shard)
        worker._warn_rejections(ctx, shard, pool)
    assert len(pool.indices) - shard.num_generated == worker._shard_cap(cfg, shard) == reserve_per_shard(cfg) == 13
    assert not (pool.kept & pool.outside).any()
    assert pool.shortfall == shard.num_kept - int((~pool.outside).sum()) > 0
    assert "keeps only" in caplog.text and "--reserve" in caplog.text and "--strength" in caplog.text


def test_stratified_keep_matches_the_plan_per_class(monkeypatch):
    cfg = _config(n=30, shard_size=30, keep=0.5)
    fake, _ = _fake_generate(lambda i: False)
    monkeypatch.setattr(worker, "generate_latents", fake)
    ctx = _context(cfg, labelled=True, proportions=[0.6, 0.3, 0.1])
    shard = plan_job(cfg).shards[0]
    pool = filter_shard(ctx, shard)
    assert torch.bincount(pool.labels[pool.kept], minlength=3).tolist() == [18, 9, 3]
    assert len(pool.indices) == shard.num_generated  # nothing rejected, nothing extra


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_pools_are_scored(n):
    ctx = _context(_config(), labelled=False)
    x = torch.randn(n, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    scores = pool_scores(ctx, x, None)
    assert scores.shape == (n,) and torch.isfinite(scores).all()
    kept, _ = select_kept(scores, torch.ones(n, dtype=torch.bool), None, torch.tensor([n]))
    assert kept.all()
