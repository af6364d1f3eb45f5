"""Worker entry point for `accelerate launch`: each process owns whole shards.

    accelerate launch --multi_gpu --num_processes K -m pipeline.jobs.distributed JOB.json

JOB.json (`pipeline.jobs.executors.write_spec`) holds the config and the pending shard ids as ranges
(computed once by the parent; a few integers whatever `--n`). Each process joins the run the parent started
(`Run.join`: the run's token names its temporary files), takes its contiguous share (`ShardRanges.share`: the
ids `PartialState.split_between_processes` would give it from the full list) and writes it in order; nothing
is gathered: every process writes its own shards, manifest parts and done markers. On CPU the process group
uses gloo. A full disk is one `error:` line and exit code 2, as in the parent.
"""

from __future__ import annotations

import logging
import sys

import torch

from storage.run_folder import OutOfSpace
from storage.run_record import read_job_spec

from ..config import AugmentConfig
from ..plan import ShardRanges
from .executors import run_shards
from .exit_codes import EXIT_BAD_INPUT
from .job import Run

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
    if on_cpu:  # the launcher's thread count when it gave one (byte-identical to one process), else a share
        share = max(1, torch.get_num_threads() // max(1, state.num_processes))
        torch.set_num_threads(int(spec.get("cpu_threads") or share))
    try:
        run = Run.join(cfg)
        run.ctx.worker = f"rank{state.process_index}"
        mine = ShardRanges(spec["shard_ranges"]).share(state.process_index, state.num_processes)
        log.info("%r on %s", mine, device)
        run_shards(run.ctx, run.plan, mine)
        state.wait_for_everyone()
    except OutOfSpace as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
