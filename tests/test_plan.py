"""The lazy plan: a shard's indices from its id alone, O(1) time and memory to plan any `n`."""

from __future__ import annotations

import math
import time
import tracemalloc
from pathlib import Path

import pytest

from pipeline.config import AugmentConfig
from pipeline.plan import RemainingShards, ShardPlan, plan_job, shard_plan


def _eager_plan(n: int, shard_size: int, keep: float) -> list[ShardPlan]:
    """The plan as the loop over shards defines it (shards of shard_size kept, each over-generated)."""
    shards, first = [], 0
    for shard_id in range(math.ceil(n / shard_size)):
        kept = min(shard_size, n - shard_id * shard_size)
        generated = math.ceil(kept / keep - 1e-9)
        shards.append(ShardPlan(shard_id, first, generated, kept))
        first += generated
    return shards


@pytest.mark.parametrize(
    "n, shard_size, keep", [(1, 1000, 0.9), (17, 8, 0.75), (1001, 1000, 0.9), (2500, 1000, 0.75), (64, 8, 1.0)]
)
def test_lazy_plan_equals_the_shard_by_shard_definition(n, shard_size, keep):
    plan = plan_job(AugmentConfig(ref="x", out="o", n=n, shard_size=shard_size, keep=keep))
    eager = _eager_plan(n, shard_size, keep)
    assert list(plan.shards) == eager
    assert [plan.shards[i] for i in range(-len(eager), 0)] == eager
    assert plan.shards[1:3] == tuple(eager[1:3])
    assert plan.num_generated == sum(s.num_generated for s in eager) and plan.num_kept == n
    assert sum(s.num_kept for s in plan.shards) == n
    with pytest.raises(IndexError):
        plan.shards[len(eager)]


def test_planning_ten_billion_samples_costs_constant_memory_and_time():
    cfg = AugmentConfig(ref="x", out="o", n=10**10, keep=0.9)  # 10^7 shards of 1,000 kept, 1,112 generated
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = plan_job(cfg)
    last = plan.shards[-1]
    text = plan.describe(seconds_per_sample=0.1)
    remaining = RemainingShards(len(plan.shards), excluded=[0, 1, 5])
    in_the_middle = remaining[5_000_000]
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1_000_000, (elapsed, peak)
    assert len(plan.shards) == 10**7 and plan.num_generated == 10**7 * 1112
    assert last == ShardPlan(10**7 - 1, (10**7 - 1) * 1112, 1112, 1000)
    assert "10000000 shard(s)" in text and "shard 9999999" in text
    assert len(remaining) == 10**7 - 3 and in_the_middle == 5_000_003


def test_small_last_shard_is_planned_from_its_id():
    assert shard_plan(1001, 1000, 0.9, 1) == ShardPlan(1, 1112, 2, 1)
    assert shard_plan(17, 8, 0.75, 2) == ShardPlan(2, 22, 2, 1)
    with pytest.raises(IndexError):
        shard_plan(17, 8, 0.75, 3)


def test_remaining_shards_is_the_range_minus_the_excluded_ids():
    excluded = [0, 3, 4, 9]
    remaining = RemainingShards(10, excluded)
    expected = [i for i in range(10) if i not in excluded]
    assert list(remaining) == expected == remaining.tolist() and remaining == expected
    assert [remaining[i] for i in range(len(expected))] == expected
    assert remaining[-1] == 8 and remaining[1:4] == expected[1:4] and remaining[::2] == expected[::2]
    assert 5 in remaining and 3 not in remaining and 10 not in remaining
    assert remaining.excluded == (0, 3, 4, 9)
    assert RemainingShards(3, [0, 1, 2]) == [] and len(RemainingShards(3, [7])) == 3
    with pytest.raises(IndexError):
        remaining[len(expected)]


def test_a_dry_run_of_ten_billion_samples_is_immediate(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    refs = Path(__file__).resolve().parent.parent / "examples" / "thick_digits"
    args = ["--ref", str(refs), "--n", "10000000000", "--out", str(tmp_path / "out"), "--dry-run"]
    CliRunner().invoke(app, args)  # warm-up: imports
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, args)
    elapsed = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    assert "10000000 shard(s); 11120000000 samples generated, 10000000000 kept" in result.output
    assert elapsed < 2.0, elapsed
    assert not (tmp_path / "out").exists()
