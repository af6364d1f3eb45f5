"""Many nodes: a parent flow fans shard ranges out to node-level flow runs of a deployment.

    augment-fanout (parent, one run)                        augment-node (one run per range)
      Run.start: validate + encode refs, claim, plan  --->    run_shard_range(range): accelerate
      PrefectNodeRuns: run_deployment(node deployment,         launch of K workers = the node's GPUs
        range) per range under a global concurrency limit      (or in-process with processes = 1)
      all done markers present -> Run.finish + artifact

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

from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.task_runners import ThreadPoolTaskRunner

from flows.augment_flow import per_run_folder, raise_first_failure, run_flow_job, run_shard_range, split_ranges
from pipeline.config import AugmentConfig
from pipeline.jobs.executors import Executor
from pipeline.jobs.job import Run
from pipeline.plan import ShardRanges

#: Global concurrency limit that caps how many node runs execute at once.
NODE_LIMIT = "mmd-augment-nodes"
#: Tag on every node-level flow run (filter them in the UI; tag-based limits can use it too).
NODE_TAG = "mmd-augment-node"


@flow(name="augment-node", task_runner=ThreadPoolTaskRunner(max_workers=1))
def augment_node(config: AugmentConfig, shard_ranges: list[list[int]]) -> dict[str, Any]:
    """Node-level run: these shards (`[[start, stop], ...]`) of a job the parent has started, with
    `config.processes` accelerate workers on this node (one per GPU), or in-process for `processes = 1`."""
    Run.join(config, check_config=True, load=False)  # claimed by the parent, with the same config?
    return {"out": config.out, **run_shard_range(config.model_dump(mode="json"), shard_ranges)}


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
    cfg = config.model_copy(update={"out": per_run_folder(config.out)}) if per_run_output else config
    executor = PrefectNodeRuns(
        node_deployment, shards_per_node, processes_per_node, concurrency_limit, node_timeout_seconds
    )
    return run_flow_job(cfg, executor)


class PrefectNodeRuns(Executor):
    """Ranges of `shards_per_node` shards as node-level flow runs of `deployment`, at most as many at once as the
    global concurrency limit allows, each with `processes_per_node` accelerate workers."""

    phase = "nodes"

    def __init__(
        self,
        deployment: str,
        shards_per_node: int,
        processes_per_node: int | None = None,
        limit: str | None = NODE_LIMIT,
        timeout_seconds: float | None = None,
    ) -> None:
        self.deployment, self.shards_per_node, self.processes = deployment, shards_per_node, processes_per_node
        self.limit, self.timeout_seconds = limit, timeout_seconds
        self.node_runs = 0

    def write(self, run: Run, shards: ShardRanges) -> None:
        cfg = run.cfg
        node_cfg = cfg.model_copy(update={"processes": self.processes or cfg.processes, "progress": "quiet"})
        node_json = node_cfg.model_dump(mode="json")
        ranges = split_ranges(shards, self.shards_per_node)
        self.node_runs = len(ranges)
        get_run_logger().info(
            "%s: %d pending shard(s) -> %d node run(s) of %s", cfg.out, len(shards), len(ranges), self.deployment
        )
        futures = [
            run_node.submit(self.deployment, node_json, r.to_json(), self.limit, self.timeout_seconds) for r in ranges
        ]
        raise_first_failure(futures, ranges)

    def report(self) -> dict[str, object]:
        return {"node_runs": self.node_runs}
