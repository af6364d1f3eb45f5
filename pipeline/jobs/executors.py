"""Executors: where a run's pending shards are written. One contract, `Executor`, in the manner of datatrove's
executors: `executor(run, shards)` skips the shards whose done marker already vouches for their bytes, writes
the others (`write`, the only thing an executor defines), checks that each one got its marker, and returns
how many it wrote. Every shard is written by `pipeline.jobs.worker.run_shard`, so every executor writes the
same bytes for the same shard.

    InProcess            this process: one CPU or one GPU
    AccelerateWorkers    `accelerate launch` of K processes on this node (one per GPU; gloo on CPU), each
                         running `pipeline.jobs.distributed` on its share of the shards
    flows.augment_flow.PrefectTasks     the shards as Prefect tasks (retries), each on one of the two above
    flows.fanout.PrefectNodeRuns        ranges of shards as node-level flow runs of a deployment
    pipeline.jobs.static_cluster.StaticCluster   writes the job spec that `accelerate launch` runs on every
                         machine (it does not wait: `finish` checks the markers)
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch

from storage.run_folder import OutOfSpace, RunFolder
from storage.run_record import write_job_spec

from ..config import AugmentConfig
from ..plan import JobPlan, ShardRanges
from .worker import JobContext, ShardResult, run_shard

log = logging.getLogger(__name__)

#: Called with the number of kept samples just written (a progress bar's tick).
Progress = Callable[[int], None]


class Run(Protocol):
    """What an executor sees of a run (`pipeline.jobs.job.Run`)."""

    cfg: AugmentConfig
    ctx: JobContext | None
    plan: JobPlan

    def not_done(self, shards: Iterable[int]) -> ShardRanges: ...


class Executor(abc.ABC):
    """Writes the shards of a run it is handed; skipping done shards and checking the markers live here."""

    #: the name of the time it takes in the run's `seconds`
    phase = "generate_filter_write"
    #: False: `write` hands the shards over and returns before they are written (a static cluster)
    waits = True

    def report(self) -> dict[str, object]:
        """What the executor tells about its last `write` for the run's summary (node runs, ...)."""
        return {}

    def __call__(self, run: Run, shards: ShardRanges) -> int:
        todo = run.not_done(shards)
        if len(todo) < len(shards):
            log.info("skipping %d shard(s) already done", len(shards) - len(todo))
        if todo:
            self.write(run, todo)
        if self.waits:
            missing = run.not_done(todo)
            if missing:
                raise RuntimeError(f"{missing!r} have no done marker after the run; rerun to resume")
        return len(todo)

    @abc.abstractmethod
    def write(self, run: Run, shards: ShardRanges) -> None:
        """Write these shards (none of them done yet)."""


class InProcess(Executor):
    """One after the other in this process; `progress` gets kept samples, `on_shard` each shard's result."""

    def __init__(self, progress: Progress | None = None, on_shard: Callable[[ShardResult], None] | None = None):
        self.progress, self.on_shard = progress, on_shard

    def write(self, run: Run, shards: ShardRanges) -> None:
        run_shards(run.ctx, run.plan, shards, kept_progress(run.plan, self.progress), self.on_shard)


class AccelerateWorkers(Executor):
    """`accelerate launch` of `cfg.processes` workers on this node; `progress` follows their done markers."""

    def __init__(self, progress: Progress | None = None):
        self.progress = progress

    def write(self, run: Run, shards: ShardRanges) -> None:
        launch_workers(run.cfg, shards, self.progress)


def node_executor(
    cfg: AugmentConfig, progress: Progress | None = None, on_shard: Callable[[ShardResult], None] | None = None
) -> Executor:
    """This node's executor for `cfg`: K `accelerate` workers for `processes > 1`, else this process."""
    return AccelerateWorkers(progress) if cfg.processes > 1 else InProcess(progress, on_shard)


def run_shards(
    ctx: JobContext,
    plan: JobPlan,
    shard_ids: Iterable[int],
    progress: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> list[ShardResult]:
    """Generate, filter and write these shards one after the other in this process (the plan is lazy:
    shard `sid` is computed from its id, so any --n costs O(1) to look up)."""
    results = []
    for sid in shard_ids:
        result = run_shard(ctx, plan.shards[sid], progress)
        results.append(result)
        if on_shard is not None:
            on_shard(result)
    return results


def kept_progress(plan: JobPlan, progress: Progress | None) -> Progress | None:
    """Turn generated-sample ticks into kept-sample ticks (kept/generated of the current shard)."""
    if progress is None:
        return None
    ratio = plan.num_kept / plan.num_generated
    carry = [0.0]

    def tick(n_generated: int) -> None:
        carry[0] += n_generated * ratio
        whole = int(carry[0])
        carry[0] -= whole
        if whole:
            progress(whole)

    return tick


def launch_workers(cfg: AugmentConfig, shards: ShardRanges, progress: Progress | None = None) -> None:
    """`accelerate launch` K worker processes on this node (gloo on CPU, NCCL on GPUs) for these shards;
    `progress` gets the kept count of every shard whose done marker appears.

    The workers get the shards as ranges (the job spec's size does not grow with `--n`); each one
    takes its `ShardRanges.share` and writes it in order.

    Raises:
        OutOfSpace: a worker stopped because the disk is full (exit code 2 of the CLI).
        RuntimeError: a worker failed otherwise.
    """
    folder = RunFolder(cfg.out, cfg.prefix)
    with tempfile.TemporaryDirectory(prefix="augment-") as tmp:
        # CPU float reductions depend on the intra-op thread count: workers use the launcher's, so that K
        # workers write the bytes one process writes (`pipeline.jobs.distributed`)
        spec = write_spec(Path(tmp) / "job.json", cfg, shards, cpu_threads=torch.get_num_threads())
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            str(cfg.processes),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "pipeline.jobs.distributed",
            str(spec),
        ]
        log.info("launching %d workers: %s", cfg.processes, " ".join(cmd))
        # K workers x the launcher's threads oversubscribe a CPU: passive OpenMP threads sleep instead of spinning
        # (measured on 2 cores: 14 s instead of 42 s for a 64-sample job, as fast as one thread per worker)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.Popen(cmd, env=env)
        markers = _MarkerWatch(cfg, shards) if progress is not None else None
        while proc.poll() is None:
            time.sleep(1.0)
            if markers is not None:
                markers.report(progress)
        if markers is not None:
            markers.report(progress)
        if proc.returncode != 0:
            if folder.out_of_space():
                raise OutOfSpace(folder.no_space_message())
            raise RuntimeError(f"worker processes failed with exit code {proc.returncode}; rerun to resume")


def write_spec(path: Path, cfg: AugmentConfig, shards: ShardRanges, **extra: object) -> Path:
    """The job spec `pipeline.jobs.distributed` reads: the config and the shards as ranges."""
    return write_job_spec(path, cfg.model_dump(mode="json"), shards.ranges, **extra)


class _MarkerWatch:
    """The done markers of K workers' shares, followed by one cursor per worker: a worker writes its
    share in order, so each poll reads a few markers and memory is O(K), not O(shards)."""

    def __init__(self, cfg: AugmentConfig, shards: ShardRanges) -> None:
        self.folder = RunFolder(cfg.out, cfg.prefix)
        self.cursors = [iter(shards.share(rank, cfg.processes)) for rank in range(cfg.processes)]
        self.next_ids = [next(c, None) for c in self.cursors]

    def report(self, progress: Progress) -> None:
        for rank, cursor in enumerate(self.cursors):
            sid = self.next_ids[rank]
            while sid is not None:
                marker = self.folder.read_marker(sid)
                if marker is None:
                    break
                progress(int(marker.get("count", 0)))
                sid = next(cursor, None)
            self.next_ids[rank] = sid


def free_port() -> int:
    """A TCP port free on this machine now (for the launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
