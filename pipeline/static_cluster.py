"""A job on a static cluster without Prefect: prepare once, `accelerate launch` on every machine, finish once.

    python -m pipeline.static_cluster prepare --config job.json --spec /shared/job-spec.json
    accelerate launch --config_file deploy/accelerate-multinode.yaml --machine_rank $RANK \\
        -m pipeline.distributed /shared/job-spec.json          # on each machine
    python -m pipeline.static_cluster finish --spec /shared/job-spec.json

`prepare` is `pipeline.job.start_job` (validate and encode the references into the shared cache,
claim the output folder, clean crashed writes, list the pending shards) and writes the job spec that
`pipeline.distributed` reads. `finish` checks that every shard is done and is `pipeline.job.finish_job`
(merge the manifest, write run.json). Re-running `prepare` after a crash lists only what is missing.
No Prefect here: the same steps the `augment` flow runs as tasks (one of the executors next to
`pipeline.executors`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from storage.errors import InputError
from storage.run_record import read_job_spec, write_job_spec
from storage.shards import is_done

from . import job
from .config import AugmentConfig
from .plan import plan_job


def prepare(cfg: AugmentConfig, spec: str | Path) -> list[int]:
    """Start the job here and write the spec for the workers; returns the pending shard ids."""
    _, plan, pending = job.start_job(cfg)
    write_job_spec(spec, cfg.model_dump(mode="json"), pending, prepared_at=time.time())
    print(f"{cfg.out}: {len(pending)} of {len(plan.shards)} shard(s) pending; spec written to {spec}")
    return pending


def finish(spec: str | Path) -> job.JobSummary:
    """Merge the manifest and write run.json once every shard of the job is done."""
    data = read_job_spec(spec)
    cfg = AugmentConfig.model_validate(data["config"])
    plan = plan_job(cfg)
    missing = [s.shard_id for s in plan.shards if not is_done(cfg.out, cfg.prefix, s.shard_id)]
    if missing:
        raise SystemExit(f"{cfg.out}: shard(s) {missing} not done; run `prepare` again and relaunch the workers")
    ctx = job.build_context(cfg)
    summary = job.finish_job(cfg, ctx.model, ctx.bundle, plan, len(data["shards"]), {})
    print(f"kept {summary.num_kept} of {summary.num_generated} samples in {summary.out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.static_cluster", description=__doc__.split("\n")[0])
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
            finish(args.spec)
    except (InputError, ValidationError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
