"""Worker entry point for `accelerate launch`: each process owns whole shards.

    accelerate launch --multi_gpu --num_processes K -m pipeline.jobs.distributed JOB.json

JOB.json (`storage.run_record.write_job_spec`) holds the config and the pending shard ids as ranges
(computed once by the parent; a few integers whatever `--n`). Each process takes its contiguous share
(`ShardRanges.share`: the ids `PartialState.split_between_processes` would give it from the full list)
and looks its shards up lazily; nothing is gathered: every process writes its own shards, manifest parts
and done markers. On CPU the process group uses gloo.
"""

from __future__ import annotations

import logging
import sys

import torch

from storage.run_record import read_job_spec

from ..config import AugmentConfig
from ..plan import ShardRanges, plan_job
from .executors import run_shards_in_process
from .job import build_context

log = logging.getLogger("pipeline.jobs.distributed")


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState

    argv = sys.argv[1:] if argv is None else argv
    spec = read_job_spec(argv[0])
    cfg = AugmentConfig.model_validate(spec["config"])
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    device = "cpu" if on_cpu else str(state.device)
    cfg = cfg.model_copy(update={"device": device, "processes": 1})
    logging.basicConfig(level=logging.INFO, format=f"[rank {state.process_index}] %(levelname)s %(message)s")
    if on_cpu:
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, state.num_processes)))
    try:
        ctx = build_context(cfg)
        ctx.worker = f"rank{state.process_index}"
        plan = plan_job(cfg)
        mine = ShardRanges(spec["shard_ranges"]).share(state.process_index, state.num_processes)
        log.info("%r on %s", mine, device)
        run_shards_in_process(ctx, plan, mine)
        state.wait_for_everyone()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
