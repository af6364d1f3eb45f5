"""Many nodes: a parent flow fans shard ranges out to node-level flow runs of a deployment.

    augment-fanout (parent, one run)                        augment-node (one run per range)
      start_job: validate + encode refs, claim, plan  --->    run_shard_range(range): accelerate
      run_deployment(node deployment, range) per range         launch of K workers = the node's GPUs
        under a global concurrency limit (N nodes at once)    (or in-process with processes = 1)
      all done markers present -> finish_job + artifact

Requirements (see docs "Scaling out"): the output folder and the reference cache dir are on storage
every node mounts at the same path (a ReadWriteMany volume, NFS, ...): nodes write their own shards,
manifest parts and done markers there, and all of them reuse the bundle the parent encoded (the same
reference latents everywhere, so the output does not depend on which node ran which shard). The cap
on concurrent node runs is a Prefect global concurrency limit, created once:

    prefect gcl create mmd-augment-nodes --limit 4

(`deploy/prefect.yaml` also gives the node deployment `concurrency_limit: 4`.) Different nodes guide
their shards independently, exactly as the K processes of one node do.
"""

# No `from __future__ import annotations`: Prefect reads the flow's parameter types at run time.

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.augment_flow import (
    finish_and_publish,
    per_run_folder,
    reference_task,
    run_shard_range,
    split_ranges,
    start_job,
)
from pipeline.config import AugmentConfig
from pipeline.jobs import job
from pipeline.plan import ShardRanges
from storage.run_record import CLAIM_FILE, check_or_claim_output

#: Global concurrency limit that caps how many node runs execute at once.
NODE_LIMIT = "mmd-augment-nodes"
#: Tag on every node-level flow run (filter them in the UI; tag-based limits can use it too).
NODE_TAG = "mmd-augment-node"


@flow(name="augment-node", task_runner=ThreadPoolTaskRunner(max_workers=1))
def augment_node(config: AugmentConfig, shard_ranges: list[list[int]]) -> dict[str, Any]:
    """Node-level run: these shards (`[[start, stop], ...]`) of a job the parent has started, with
    `config.processes` accelerate workers on this node (one per GPU), or in-process for `processes = 1`."""
    cfg = config
    if not (Path(cfg.out) / CLAIM_FILE).exists():
        raise RuntimeError(
            f"{cfg.out}: not claimed by a parent run; the output folder must be storage shared with "
            "the parent flow (mounted at the same path on every node)"
        )
    check_or_claim_output(cfg.out, cfg.config_hash, cfg.hashed_fields())  # same config as the parent?
    return {"out": cfg.out, **run_shard_range(cfg.model_dump(mode="json"), shard_ranges)}


def _node_run_name() -> str:
    from prefect.runtime import task_run

    shards = ShardRanges(task_run.parameters.get("shard_ranges") or [])
    return f"node-{shards[0]:06d}-{shards[-1]:06d}" if shards else "node-none"


@task(name="run-node", task_run_name=_node_run_name, retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE)
def run_node(
    deployment: str,
    config: dict[str, Any],
    shard_ranges: list[list[int]],
    limit: str | None = NODE_LIMIT,
    timeout_seconds: float | None = None,
) -> list[list[int]]:
    """Run one node-level flow run for these shards (`[[start, stop], ...]`) and wait for it, holding one
    slot of `limit`.

    A retry starts a new node run, which skips the shards the failed one finished.
    """
    logger = get_run_logger()
    slot = concurrency(limit, occupy=1, strict=True) if limit else nullcontext()
    with slot:
        run = run_deployment(
            deployment,
            parameters={"config": config, "shard_ranges": shard_ranges},
            timeout=timeout_seconds,
            tags=[NODE_TAG],
        )
    state = run.state
    shards = ShardRanges(shard_ranges)
    if state is None or not state.is_completed():
        raise RuntimeError(f"node run {run.name} for {shards!r} ended {state.name if state else 'unknown'}")
    logger.info("node run %s finished %r", run.name, shards)
    return shards.to_json()


@flow(name="augment-fanout", task_runner=ThreadPoolTaskRunner(max_workers=64))
def augment_fanout(
    config: AugmentConfig,
    node_deployment: str = "augment-node/gpu-node",
    shards_per_node: int = 8,
    processes_per_node: int | None = None,
    concurrency_limit: str | None = NODE_LIMIT,
    node_timeout_seconds: float | None = None,
    per_run_output: bool = False,
) -> dict[str, Any]:
    """Start the job here, fan its pending shards out to node-level runs, finish it here.

    Args:
        config: the job (same object as the CLI and the single-node flow).
        node_deployment: `flow-name/deployment-name` of the `augment-node` deployment to run.
        shards_per_node: shards per node run (the unit of retry and of scheduling onto a node).
        processes_per_node: accelerate workers per node run (= GPUs per node); default config.processes.
        concurrency_limit: global concurrency limit capping node runs at once (None: no cap).
        node_timeout_seconds: give up waiting for a node run after this long (None: wait).
        per_run_output: write into `<config.out>/<scheduled start time>`.
    """
    logger = get_run_logger()
    cfg = config
    if per_run_output:
        cfg = cfg.model_copy(update={"out": per_run_folder(cfg.out)})
    t0 = time.perf_counter()
    ref_state = reference_task(cfg)(cfg.model_dump(mode="json"), return_state=True)
    reference = ref_state.result()
    ctx, plan, pending = start_job(cfg)
    with job.holding_output(cfg):  # a failure from here on gives the folder back (its claim if no sample)
        t1 = time.perf_counter()
        node_cfg = cfg.model_copy(update={"processes": processes_per_node or cfg.processes, "progress": "quiet"})
        node_json = node_cfg.model_dump(mode="json")
        ranges = split_ranges(pending, shards_per_node)
        logger.info(
            "%s: %d pending shard(s) -> %d node run(s) of %s", cfg.out, len(pending), len(ranges), node_deployment
        )
        futures = [
            run_node.submit(node_deployment, node_json, r.to_json(), concurrency_limit, node_timeout_seconds)
            for r in ranges
        ]
        wait(futures)
        missing = job.shards_not_done(cfg, pending)
        if missing:
            failed = [f for f in futures if not f.state.is_completed()]
            logger.error("%r are not done; re-run this flow to resume them", missing)
            if failed:
                failed[0].result()
            raise RuntimeError(f"{missing!r} are not done")
        t2 = time.perf_counter()
        seconds = {"prepare": round(t1 - t0, 3), "nodes": round(t2 - t1, 3)}
        return finish_and_publish(
            cfg, ctx, plan, len(pending), seconds, t0, ref_state, reference, node_runs=len(ranges)
        )
