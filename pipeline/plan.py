"""A deterministic plan of shards and batches: a pure function of the config (never of process count).

Shard k keeps `min(shard_size, n − k·shard_size)` samples and generates ⌈kept / keep⌉ of them, so that
exactly `n` are kept overall. Sample indices are global and consecutive across shards; a batch is a
fixed slice of a shard's indices; every sample's target class (labelled references) is fixed by the plan.

The plan is lazy: `shard_plan` computes a shard's indices from its id alone, and `JobPlan.shards` is a
sequence that builds a `ShardPlan` only when asked for one. Planning costs O(1) time and memory for any
`n`, so `--n 10_000_000_000` plans (and dry-runs) instantly and a run holds one shard at a time.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import torch

from .config import AugmentConfig
from .seeding import derive_seed, sample_seed


@dataclass(frozen=True)
class ShardPlan:
    shard_id: int
    first_index: int  # global index of the shard's first generated sample
    num_generated: int
    num_kept: int

    @property
    def indices(self) -> range:
        return range(self.first_index, self.first_index + self.num_generated)

    def batches(self, batch_size: int) -> list[range]:
        idx = self.indices
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def generated_for(kept: int, keep: float) -> int:
    """Samples to generate so that the filter keeps `kept` at keep fraction `keep`: ⌈kept / keep⌉."""
    return math.ceil(kept / keep - 1e-9)


def num_shards(n: int, shard_size: int) -> int:
    """⌈n / shard_size⌉ shards (the last one may keep fewer)."""
    return -(-n // shard_size)


def shard_plan(n: int, shard_size: int, keep: float, shard_id: int) -> ShardPlan:
    """Shard `shard_id` of a job keeping `n` samples in shards of `shard_size`, from its id alone.

    Every shard before the last keeps `shard_size` and generates ⌈shard_size / keep⌉, so shard k's
    first global index is k·⌈shard_size / keep⌉; the last shard keeps the remainder.
    """
    count = num_shards(n, shard_size)
    if not 0 <= shard_id < count:
        raise IndexError(f"shard {shard_id} out of range: the plan has {count} shard(s)")
    kept = min(shard_size, n - shard_id * shard_size)
    return ShardPlan(shard_id, shard_id * generated_for(shard_size, keep), generated_for(kept, keep), kept)


class Shards(Sequence[ShardPlan]):
    """The plan's shards as a lazy, immutable sequence: item k is computed by `shard_plan` on access."""

    __slots__ = ("_keep", "_len", "_n", "_shard_size")

    def __init__(self, n: int, shard_size: int, keep: float) -> None:
        self._n, self._shard_size, self._keep = n, shard_size, keep
        self._len = num_shards(n, shard_size)

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, key: int) -> ShardPlan: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[ShardPlan, ...]: ...
    def __getitem__(self, key: int | slice) -> ShardPlan | tuple[ShardPlan, ...]:
        if isinstance(key, slice):
            return tuple(self[i] for i in range(self._len)[key])
        index = int(key)
        if index < 0:
            index += self._len
        return shard_plan(self._n, self._shard_size, self._keep, index)

    def __iter__(self) -> Iterator[ShardPlan]:
        return (shard_plan(self._n, self._shard_size, self._keep, i) for i in range(self._len))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Shards):
            return (self._n, self._shard_size, self._keep) == (other._n, other._shard_size, other._keep)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._n, self._shard_size, self._keep))

    def __repr__(self) -> str:
        return f"Shards(n={self._n}, shard_size={self._shard_size}, keep={self._keep}: {self._len} shard(s))"


class ShardRanges(Sequence[int]):
    """Shard ids as sorted, disjoint half-open ranges `[start, stop)`: a compact, lazy sequence.

    What a process, a task or a node run is handed (`ranges`, as JSON `[[start, stop], ...]`): its size
    is the number of ranges (one for a fresh job, about one per process after a crash), never the
    number of shards, so a job of 10^10 samples hands each process a few integers. Indexing and slicing
    find positions by bisection; a slice is again a `ShardRanges`; `share` is a process's part.
    """

    __slots__ = ("_offsets", "_ranges")

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        merged: list[tuple[int, int]] = []
        for start, stop in sorted((int(a), int(b)) for a, b in ranges):
            if start < 0:
                raise ValueError(f"shard ids must be >= 0, got the range [{start}, {stop})")
            if stop <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        self._ranges = tuple(merged)
        offsets = [0]
        for start, stop in merged:
            offsets.append(offsets[-1] + stop - start)
        self._offsets = tuple(offsets)  # position of each range's first id; the last one is the length

    @classmethod
    def from_ids(cls, ids: Iterable[int]) -> ShardRanges:
        """The ranges of ascending ids (an iterator is read once; memory grows with the ranges only)."""
        ranges: list[list[int]] = []
        for i in ids:
            i = int(i)
            if ranges and i < ranges[-1][1]:
                raise ValueError(f"shard ids must ascend: {i} after {ranges[-1][1] - 1}")
            if ranges and i == ranges[-1][1]:
                ranges[-1][1] = i + 1
            else:
                ranges.append([i, i + 1])
        return cls(ranges)

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return self._ranges

    def to_json(self) -> list[list[int]]:
        """`[[start, stop], ...]`: what a job spec, a task or a node run carries."""
        return [[start, stop] for start, stop in self._ranges]

    def __len__(self) -> int:
        return self._offsets[-1]

    def _id_at(self, position: int) -> int:
        k = bisect.bisect_right(self._offsets, position) - 1
        return self._ranges[k][0] + position - self._offsets[k]

    def _between(self, first: int, last: int) -> ShardRanges:
        """The ids at positions `first..last-1` (0 <= first <= last <= len), as ranges."""
        if first >= last:
            return ShardRanges()
        k0 = bisect.bisect_right(self._offsets, first) - 1
        k1 = bisect.bisect_right(self._offsets, last - 1) - 1
        parts = [list(r) for r in self._ranges[k0 : k1 + 1]]
        parts[0][0] = self._id_at(first)
        parts[-1][1] = self._id_at(last - 1) + 1
        return ShardRanges(parts)

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> ShardRanges | list[int]: ...
    def __getitem__(self, key: int | slice) -> int | ShardRanges | list[int]:
        if isinstance(key, slice):
            positions = range(len(self))[key]
            if positions.step != 1:
                return [self._id_at(p) for p in positions]
            return self._between(positions.start, positions.stop)
        position = int(key)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"position {key} out of range ({len(self)} shard(s))")
        return self._id_at(position)

    def without(self, ids: Iterable[int]) -> ShardRanges:
        """These shards minus `ids`, as ranges: O(ranges + len(ids)), never O(shards)."""
        excluded = sorted({int(i) for i in ids})
        out: list[tuple[int, int]] = []
        for start, stop in self._ranges:
            k = bisect.bisect_left(excluded, start)
            cursor = start
            while k < len(excluded) and excluded[k] < stop:
                if excluded[k] > cursor:
                    out.append((cursor, excluded[k]))
                cursor = excluded[k] + 1
                k += 1
            if cursor < stop:
                out.append((cursor, stop))
        return ShardRanges(out)

    def share(self, index: int, count: int) -> ShardRanges:
        """Part `index` of `count` contiguous parts, the first `len % count` one longer: the same ids
        `accelerate`'s `split_between_processes` gives process `index` of `count` from the full list."""
        if not 0 <= index < count:
            raise ValueError(f"part {index} of {count} does not exist")
        each, extra = divmod(len(self), count)
        first = index * each + min(index, extra)
        return self._between(first, first + each + (1 if index < extra else 0))

    def chunks(self, size: int) -> list[ShardRanges]:
        """Consecutive parts of at most `size` ids (the units of a task or a node run)."""
        if size < 1:
            raise ValueError(f"a part must hold >= 1 shard, got {size}")
        return [self._between(p, min(p + size, len(self))) for p in range(0, len(self), size)]

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(range(start, stop) for start, stop in self._ranges)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        k = bisect.bisect_right(self._ranges, (value, math.inf)) - 1
        return k >= 0 and self._ranges[k][0] <= value < self._ranges[k][1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardRanges):
            return self._ranges == other._ranges
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=False))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def tolist(self) -> list[int]:
        """Every id, materialised (small jobs and tests; what is handed around is `to_json`)."""
        return list(self)

    def __repr__(self) -> str:
        shown = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in self._ranges[:3])
        more = f", ... ({len(self._ranges) - 3} more ranges)" if len(self._ranges) > 3 else ""
        return f"ShardRanges({len(self)} shard(s): {shown}{more})"


class RemainingShards(ShardRanges):
    """Shard ids `0..total−1` except `excluded` (e.g. the done ones), ascending, as ranges.

    Holds the excluded ids and the ranges between them, so the shards left of a job of any size cost
    memory in proportion to the work done, not to `n`.
    """

    __slots__ = ("_excluded", "_total")

    def __init__(self, total: int, excluded: Iterable[int] = ()) -> None:
        self._total = int(total)
        self._excluded = tuple(sorted({int(i) for i in excluded if 0 <= int(i) < total}))
        gaps, start = [], 0
        for done in self._excluded:
            if done > start:
                gaps.append((start, done))
            start = done + 1
        super().__init__([*gaps, (start, self._total)])

    @property
    def excluded(self) -> tuple[int, ...]:
        return self._excluded

    def __repr__(self) -> str:
        return f"RemainingShards({len(self)} of {self._total}, excluding {len(self._excluded)})"


@dataclass(frozen=True)
class JobPlan:
    shards: Shards
    num_kept: int
    num_generated: int

    def describe(self, seconds_per_sample: float | None = None) -> str:
        lines = [
            f"{len(self.shards)} shard(s); {self.num_generated} samples generated, {self.num_kept} kept "
            f"({self.num_kept / self.num_generated:.1%})",
        ]
        for s in self.shards[:3]:
            lines.append(
                f"  shard {s.shard_id:06d}: indices {s.first_index}..{s.first_index + s.num_generated - 1}"
                f" generate {s.num_generated}, keep {s.num_kept}"
            )
        if len(self.shards) > 4:
            lines.append(f"  ... {len(self.shards) - 4} more")
        if len(self.shards) > 3:
            s = self.shards[-1]
            lines.append(
                f"  shard {s.shard_id:06d}: indices {s.first_index}..{s.first_index + s.num_generated - 1}"
                f" generate {s.num_generated}, keep {s.num_kept}"
            )
        if seconds_per_sample is not None:
            total = seconds_per_sample * self.num_generated
            lines.append(f"estimated time: {_fmt_seconds(total)} at {seconds_per_sample:.3f} s/sample (one process)")
        return "\n".join(lines)


def _fmt_seconds(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def plan_job(cfg: AugmentConfig) -> JobPlan:
    """Shards of `shard_size` kept samples each (the last one smaller), over-generated by 1/keep.

    O(1) time and memory for any `n`: shards are computed on access (see `shard_plan`).
    """
    shards = Shards(cfg.n, cfg.shard_size, cfg.keep)
    last = shards[-1]
    return JobPlan(shards, num_kept=cfg.n, num_generated=last.first_index + last.num_generated)


def seeds_for(cfg: AugmentConfig, indices: Sequence[int]) -> list[int]:
    return [sample_seed(cfg.seed, int(i)) for i in indices]


def class_proportions(labels: torch.Tensor | None, num_classes: int, balance: str) -> torch.Tensor | None:
    """Target class proportions: the references' own, or uniform over the classes present."""
    if labels is None:
        return None
    counts = torch.bincount(labels, minlength=num_classes).double()
    if balance == "uniform":
        counts = (counts > 0).double()
    return counts / counts.sum()


def assign_classes(cfg: AugmentConfig, shard: ShardPlan, proportions: torch.Tensor | None) -> torch.Tensor | None:
    """Each generated sample's target class: exact quotas per shard (largest remainder), then a
    shard-seeded permutation, so a shard's class mix matches the proportions as closely as possible."""
    if proportions is None:
        return None
    n = shard.num_generated
    labels = torch.repeat_interleave(torch.arange(len(proportions)), class_quotas(proportions, n))
    gen = torch.Generator().manual_seed(derive_seed("classes", cfg.seed, shard.shard_id))
    return labels[torch.randperm(n, generator=gen)]


def class_quotas(proportions: torch.Tensor, count: int) -> torch.Tensor:
    """How many of `count` samples each class gets: ⌊p_c·count⌋, the remainder to the largest fractional
    parts (ties: lower class id). Sums to `count` exactly; the filter keeps each class's quota of a shard."""
    quota = proportions.double() * count
    counts = quota.floor().long()
    remainder = count - int(counts.sum())
    order = torch.argsort(quota - counts, descending=True, stable=True)
    counts[order[:remainder]] += 1
    return counts


def primary_count(cfg: AugmentConfig) -> int:
    """Number of primary sample indices of the whole job (every shard's planned pool), in O(1)."""
    full, rest = divmod(cfg.n, cfg.shard_size)
    return full * cfg.samples_per_shard + (math.ceil(rest / cfg.keep - 1e-9) if rest else 0)


def reserve_per_shard(cfg: AugmentConfig) -> int:
    """The cap on extra samples one shard may generate to replace rejected ones: ⌈reserve × full pool⌉."""
    return math.ceil(cfg.reserve * cfg.samples_per_shard - 1e-9)


def reserved_index(cfg: AugmentConfig, shard_id: int, i: int) -> int:
    """Global index of shard `shard_id`'s i-th reserved sample (0 <= i < reserve_per_shard).

    Reserved indices follow every primary index, one fixed block per shard:
    primary_count + shard_id·R + i with R = reserve_per_shard(cfg). So they are disjoint from every
    primary index and from every other shard's reserve, and a pure function of (config, shard, i): the
    extra samples a shard draws are the same whatever process or resume draws them.
    """
    size = reserve_per_shard(cfg)
    if not 0 <= i < size:
        raise ValueError(f"reserved sample {i} of shard {shard_id} is outside its reserve of {size}")
    if shard_id < 0:
        raise ValueError(f"shard id must be >= 0, got {shard_id}")
    return primary_count(cfg) + shard_id * size + i
