"""Executors: where the pending shards of a job run. Every one goes through `pipeline.jobs.worker.run_shard`,
so each writes the same bytes for the same shard.

    run_shards_in_process         this process: one CPU or one GPU
    launch_workers                `accelerate launch` of K processes on this node (one per GPU; gloo on
                                  CPU), each running `pipeline.jobs.distributed` on its share of the shards
    pipeline.jobs.static_cluster  many machines without Prefect: prepare once, `accelerate launch` on every
                                  machine, finish once (built on these two and on `pipeline.jobs.job`)

Prefect's tasks (`flows/`) call these same functions.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from storage.run_record import write_job_spec
from storage.shards import read_marker

from ..config import AugmentConfig
from ..plan import JobPlan, ShardRanges
from .worker import JobContext, ShardResult, run_shard

log = logging.getLogger(__name__)


def run_shards_in_process(
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


def launch_workers(cfg: AugmentConfig, shards: ShardRanges, progress: Callable[[int], None] | None = None) -> None:
    """`accelerate launch` K worker processes on this node (gloo on CPU, NCCL on GPUs) for these shards;
    `progress` gets the kept count of every shard whose done marker appears.

    The workers get the shards as ranges (the job spec's size does not grow with `--n`); each one
    takes its `ShardRanges.share` and writes it in order.
    """
    with tempfile.TemporaryDirectory(prefix="augment-") as tmp:
        spec = write_job_spec(Path(tmp) / "job.json", cfg.model_dump(mode="json"), shards.ranges)
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
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen(cmd, env=env)
        markers = _MarkerWatch(cfg, shards) if progress is not None else None
        while proc.poll() is None:
            time.sleep(1.0)
            if markers is not None:
                markers.report(progress)
        if markers is not None:
            markers.report(progress)
        if proc.returncode != 0:
            raise RuntimeError(f"worker processes failed with exit code {proc.returncode}; rerun to resume")


class _MarkerWatch:
    """The done markers of K workers' shares, followed by one cursor per worker: a worker writes its
    share in order, so each poll reads a few markers and memory is O(K), not O(shards)."""

    def __init__(self, cfg: AugmentConfig, shards: ShardRanges) -> None:
        self.cfg = cfg
        self.cursors = [iter(shards.share(rank, cfg.processes)) for rank in range(cfg.processes)]
        self.next_ids = [next(c, None) for c in self.cursors]

    def report(self, progress: Callable[[int], None]) -> None:
        for rank, cursor in enumerate(self.cursors):
            sid = self.next_ids[rank]
            while sid is not None:
                marker = read_marker(self.cfg.out, self.cfg.prefix, sid)
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
