"""A job on a static cluster without Prefect: prepare once, `accelerate launch` on every machine, finish once.

    python -m pipeline.jobs.static_cluster prepare --config job.json --spec /shared/job-spec.json
    accelerate launch --config_file deploy/accelerate-multinode.yaml --machine_rank $RANK \\
        -m pipeline.jobs.distributed /shared/job-spec.json          # on each machine
    python -m pipeline.jobs.static_cluster finish --spec /shared/job-spec.json

`prepare` is `Run.start` (validate and encode the references into the shared cache, claim the output folder,
clean crashed writes, list the pending shards) with the `StaticCluster` executor, which writes the job spec
that `pipeline.jobs.distributed` reads. `finish` checks that every shard is done and is `Run.finish` (merge the
manifest, write run.json). Re-running `prepare` after a crash lists only what is missing.
The spec holds the pending shards as ranges (`pipeline.plan.ShardRanges`): its size does not grow with
`--n`, and each worker computes its own share. Exit codes as `augment`'s: 0 delivered, 2 bad input or
settings, 3 `finish` found the run kept fewer than `--n` samples (unless `allow_shortfall`).
No Prefect here: the same steps the `augment` flow runs as tasks (one of the executors next to
`pipeline.jobs.executors`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from storage.errors import InputError
from storage.run_record import read_job_spec

from ..config import AugmentConfig
from ..plan import ShardRanges
from .executors import Executor, write_spec
from .exit_codes import EXIT_BAD_INPUT, EXIT_DELIVERED, EXIT_FINISHED_SHORT
from .job import Run
from .summary import FinishedShort, JobSummary, check_delivered


class StaticCluster(Executor):
    """Hands the pending shards to the machines of a static cluster: writes the job spec every machine's
    `accelerate launch -m pipeline.jobs.distributed SPEC` reads, and returns (`finish` checks the markers)."""

    waits = False

    def __init__(self, spec: str | Path) -> None:
        self.spec = Path(spec)

    def write(self, run: Run, shards: ShardRanges) -> None:
        write_spec(self.spec, run.cfg, shards, prepared_at=time.time())


def prepare(cfg: AugmentConfig, spec: str | Path) -> ShardRanges:
    """Start the job here and write the spec for the workers; returns the pending shard ids."""
    run = Run(cfg).start()
    with run.holding():
        run.execute(StaticCluster(spec))
    print(f"{cfg.out}: {len(run.pending)} of {len(run.plan.shards)} shard(s) pending; spec written to {spec}")
    return run.pending


def finish(spec: str | Path) -> JobSummary:
    """Merge the manifest and write run.json once every shard of the job is done."""
    data = read_job_spec(spec)
    run = Run.join(AugmentConfig.model_validate(data["config"]))
    missing = run.not_done(range(len(run.plan.shards)))
    if missing:
        raise SystemExit(f"{run.cfg.out}: {missing!r} not done; run `prepare` again and relaunch the workers")
    run.written = len(ShardRanges(data["shard_ranges"]))
    summary = run.finish()
    print(f"kept {summary.num_kept} of {summary.num_generated} samples in {summary.out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.jobs.static_cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="validate, encode, claim, plan; write the job spec")
    p.add_argument("--config", required=True, type=Path, help="JSON/TOML config (as for `augment --config`)")
    p.add_argument("--spec", required=True, type=Path, help="job spec to write (on shared storage)")
    f = sub.add_parser("finish", help="merge the manifest and write run.json")
    f.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(AugmentConfig.from_file(args.config), args.spec)
        else:
            summary = finish(args.spec)
            check_delivered(AugmentConfig.model_validate(read_job_spec(args.spec)["config"]), summary)
    except (InputError, ValidationError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FinishedShort as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FINISHED_SHORT
    return EXIT_DELIVERED


if __name__ == "__main__":
    sys.exit(main())
