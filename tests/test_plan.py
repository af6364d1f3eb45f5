"""The lazy plan: a shard's indices from its id alone, O(1) time and memory to plan any `n`."""

from __future__ import annotations

import math
import time
import tracemalloc
from pathlib import Path

import pytest

from pipeline.config import AugmentConfig
from pipeline.plan import RemainingShards, ShardPlan, ShardRanges, plan_job, shard_plan


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


def _accelerate_split(ids: list[int], index: int, count: int) -> list[int]:
    """What `PartialState.split_between_processes(ids)` gave process `index` of `count` (accelerate's code)."""
    from types import SimpleNamespace

    from accelerate import PartialState

    split = PartialState.split_between_processes.__wrapped__  # the generator under the context manager
    return next(split(SimpleNamespace(num_processes=count, process_index=index), ids))


@pytest.mark.parametrize("seed", range(6))
def test_each_process_computes_the_share_split_between_processes_gave_it_from_the_full_list(seed):
    import random

    rng = random.Random(seed)
    total = rng.randint(1, 30)
    done = rng.sample(range(total), rng.randint(0, total - 1))
    pending = RemainingShards(total, done)
    handed = ShardRanges(pending.to_json())  # what a job spec carries, read back by each process
    for count in (1, 2, 3, 4, 7):
        shares = [list(handed.share(index, count)) for index in range(count)]
        if count > 1:
            assert shares == [_accelerate_split(pending.tolist(), index, count) for index in range(count)]
        assert [sid for share in shares for sid in share] == sorted(set(range(total)) - set(done))  # union, disjoint


def test_what_a_process_is_handed_does_not_grow_with_n():
    """10^7 shards (n = 10^10) pending, fresh or resumed after K workers each did part of its share:
    the ranges are one, or about one per worker, and each share is computed in O(1)."""
    fresh = RemainingShards(10**7)
    assert fresh.to_json() == [[0, 10**7]] and len(fresh) == 10**7
    workers = 4
    done = [sid for w in range(workers) for sid in fresh.share(w, workers)[:3]]  # each worker did its first 3
    resumed = RemainingShards(10**7, done)
    assert len(resumed.to_json()) == workers
    tracemalloc.start()
    shares = [ShardRanges(resumed.to_json()).share(w, workers) for w in range(workers)]
    first_ids = [next(iter(s)) for s in shares]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000, peak
    assert sum(len(s) for s in shares) == len(resumed) and first_ids[0] == 3
    assert all(len(s.to_json()) <= 2 for s in shares)


def test_shard_ranges_merge_slice_and_refuse_what_is_not_ascending():
    ranges = ShardRanges([(5, 8), (0, 2), (2, 3), (9, 9)])
    assert ranges.to_json() == [[0, 3], [5, 8]] and list(ranges) == [0, 1, 2, 5, 6, 7]
    assert ranges[2:5].to_json() == [[2, 3], [5, 7]] and ranges[::2] == [0, 2, 6]
    assert 6 in ranges and 4 not in ranges and ranges[-1] == 7
    assert [c.to_json() for c in ranges.chunks(4)] == [[[0, 3], [5, 6]], [[6, 8]]]
    assert ShardRanges.from_ids(iter([0, 1, 2, 5, 6, 7])) == ranges
    with pytest.raises(ValueError, match="ascend"):
        ShardRanges.from_ids([3, 1])
    with pytest.raises(ValueError, match=">= 0"):
        ShardRanges([(-1, 2)])
