"""Prefect flows over the plain job functions of `pipeline.jobs.job` (a thin shell: no tensor code here).

    precompute_reference   validate + encode the references once; cached on (reference bytes, model)
    run_shard_range        a range of shards, in-process or as `accelerate launch` of K workers;
                           retried with exponential backoff; skips shards whose done marker exists
    augment (flow)         Run.start (validate, claim, plan) -> PrefectTasks (shard ranges as tasks) -> Run.finish
                           -> a run-summary artifact; returns paths and counts, never tensors; ends
                           Failed if it kept fewer than --n (`FinishedShort`, unless allow_shortfall)

Shards travel as ranges (`pipeline.plan.ShardRanges`, JSON `[[start, stop], ...]`): a task's parameters
and result do not grow with the number of shards it covers. A flow that fails between the job's start
and its finish gives the output folder back (`pipeline.jobs.job.Run.holding`): its lock always, its claim
too when it wrote no sample, so a corrected re-run is accepted.

The flow's parameter is the same validated `AugmentConfig` the CLI builds, and every shard goes
through `pipeline.jobs.worker.run_shard`, so a flow run and a CLI run of the same settings write the same
bytes. Resume semantics are the CLI's: a retried task or a re-run flow skips the shards already done.

Scheduling and scale-out: see `deploy/prefect.yaml`, `deploy/serve.py` and `flows/fanout.py`.
"""

# No `from __future__ import annotations`: Prefect reads the flow's parameter types at run time.

import hashlib
import logging
import threading
import time
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from pipeline.checks.reference import check_references, default_cache_dir
from pipeline.config import AugmentConfig
from pipeline.jobs import job
from pipeline.jobs.executors import Executor, node_executor
from pipeline.jobs.job import Run
from pipeline.jobs.summary import check_delivered
from pipeline.jobs.worker import JobContext
from pipeline.models.loading import LoadedModel, load_model
from pipeline.plan import ShardRanges
from storage.bundle import bundle_dir
from storage.errors import InputError
from storage.manifest import MANIFEST_DIR
from storage.references import reference_content_hash

log = logging.getLogger(__name__)

#: Bump when what `precompute_reference` returns (or how the bundle is built) changes.
REFERENCE_CACHE_VERSION = "1"
#: Result storage of `precompute_reference`, a folder under the reference cache dir.
RESULTS_SUBDIR = "prefect-results"
#: Retries of a shard range (delays 10 s, 20 s, 40 s, each ±20 % jitter).
SHARD_RETRIES = 3
SHARD_BACKOFF_SECONDS = 10.0


# ------------------------------------------------------------------------------------- cache key


def model_fingerprint(spec: str | None) -> str:
    """A stable id of the model without loading it: a local folder (the shipped prior for None) is
    hashed like `pipeline.models.loading` names it (config files + weight sizes); a hub id or an
    import path stands for itself."""
    from pipeline.models.loading import model_id_for

    if spec is None or spec == "shipped":
        from pipeline.models.shipped import SHIPPED_MODEL_DIR

        return "shipped:" + model_id_for(str(SHIPPED_MODEL_DIR))
    if Path(spec).exists():
        return "folder:" + model_id_for(spec)
    return "spec:" + spec


def reference_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Cache key of `precompute_reference`: reference content + model, not the run id, so a cached
    result survives across flow runs and deployments. None (no caching) if the inputs cannot be read:
    the task body then fails with the reader's clear message."""
    cfg = _as_config(parameters["config"])
    try:
        refs = reference_content_hash(cfg.ref)  # the bundle's own content hash, without decoding a pixel
        model = model_fingerprint(cfg.model)
    except (OSError, ValueError):
        return None
    payload = f"{REFERENCE_CACHE_VERSION}\0{refs}\0{model}".encode()
    return "reference-" + hashlib.sha256(payload).hexdigest()[:32]


# ------------------------------------------------------------- process-local model and context
# Tasks of one flow run share the flow's process (thread pool), so the model is loaded once per
# process and reused by `precompute_reference`, the flow's start and every in-process shard task.

_lock = threading.RLock()
_model_cache: dict[str, Any] = {}
_context_cache: dict[str, Any] = {}


def _model_key(cfg: AugmentConfig) -> str:
    # a rewritten model folder reloads
    return f"{model_fingerprint(cfg.model)}|{cfg.device}|{cfg.dtype}|{cfg.resolution}|{cfg.offload}"


def _context_key(cfg: AugmentConfig) -> str:
    return cfg.model_copy(update={"out": "", "progress": "quiet", "processes": 1}).model_dump_json()


def shared_model(cfg: AugmentConfig) -> LoadedModel:
    """The model for `cfg`, loaded once per process, with its original scheduler restored (the
    sampler is swapped per job by `pipeline.jobs.job.with_sampler`, which must start from the original)."""
    with _lock:
        key = _model_key(cfg)
        if _model_cache.get("key") != key:
            _model_cache.clear()
            _context_cache.clear()
            model = load_model(cfg.model, cfg.device, cfg.dtype, resolution=cfg.resolution, offload=cfg.offload)
            _model_cache.update(key=key, model=model, scheduler=model.scheduler)
        model = _model_cache["model"]
        model.scheduler = _model_cache["scheduler"]
        return model


def remember_context(ctx: JobContext) -> JobContext:
    with _lock:
        _context_cache.clear()
        _context_cache.update(key=_context_key(ctx.cfg), ctx=ctx)
    return ctx


def shared_context(cfg: AugmentConfig) -> JobContext:
    """The job context for `cfg` (model + reference bundle + MMD target), built once per process."""
    with _lock:
        if _context_cache.get("key") == _context_key(cfg) and _model_cache.get("key") == _model_key(cfg):
            return replace(_context_cache["ctx"], cfg=cfg)
        return remember_context(job.build_context(cfg, model=shared_model(cfg)))


def start_run(cfg: AugmentConfig) -> Run:
    """`Run.start` with the process's shared model; remembers the context for the tasks."""

    def context(cfg: AugmentConfig, model: Any, **kwargs: Any) -> JobContext:
        return remember_context(job.build_context(cfg, shared_model(cfg), **kwargs))

    with _lock:
        return Run(cfg).start(context)


# ------------------------------------------------------------------------------------------ tasks


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures, not bad references or settings (`InputError`: the same every time)."""
    try:
        state.result()
    except InputError:
        return False
    except Exception:
        return True
    return False


def _as_config(config: AugmentConfig | dict[str, Any]) -> AugmentConfig:
    return config if isinstance(config, AugmentConfig) else AugmentConfig.model_validate(config)


def encode_references(cfg: AugmentConfig) -> dict[str, Any]:
    """Read the references now and build (or reuse from disk) their bundle; small JSON-able facts."""
    check_references(cfg)  # before the model loads: input errors come first
    with _lock:
        bundle = remember_context(job.build_context(cfg, model=shared_model(cfg))).bundle
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return {
        "bundle_dir": str(bundle_dir(cache, bundle.content_hash, bundle.model_id)),
        "content_hash": bundle.content_hash,
        "model_id": bundle.model_id,
        "count": len(bundle.files),
        "heldout": len(bundle.heldout_files),
        "class_names": bundle.class_names,
        "bandwidth": bundle.bandwidth,
    }


@task(
    name="precompute-reference",
    cache_key_fn=reference_cache_key,
    persist_result=True,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_bad_input,
)
def precompute_reference(config: dict[str, Any]) -> dict[str, Any]:
    """Validate and encode the references into the cached bundle (safetensors on disk).

    Returns the bundle folder, content hash, model id and counts: never tensors. Cached by Prefect
    on (reference bytes, model fingerprint); the result record lives under the reference cache dir
    (see `reference_task`), next to the bundle it describes.
    """
    return encode_references(_as_config(config))


def reference_task(cfg: AugmentConfig):
    """`precompute_reference` with its result storage under the config's reference cache dir."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return precompute_reference.with_options(result_storage=(cache / RESULTS_SUBDIR).resolve())


def _range_name() -> str:
    from prefect.runtime import task_run

    shards = ShardRanges(task_run.parameters.get("shard_ranges") or [])
    return f"shards-{shards[0]:06d}-{shards[-1]:06d}" if shards else "shards-none"


@task(
    name="run-shard-range",
    task_run_name=_range_name,
    retries=SHARD_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=SHARD_BACKOFF_SECONDS),
    retry_jitter_factor=0.2,
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def run_shard_range(config: dict[str, Any], shard_ranges: list[list[int]]) -> dict[str, Any]:
    """Generate, filter and write these shards (`[[start, stop], ...]`) with this node's executor (in-process,
    or `accelerate launch` of K workers for `processes > 1`), which skips the shards already done, so a retry
    (or a re-run of the flow) only does what is missing; return their ranges and the folder of their manifest
    parts (`part-<shard>.parquet`)."""
    cfg = _as_config(config)
    shards = ShardRanges(shard_ranges)
    t0 = time.perf_counter()
    written = node_executor(cfg)(Run.join(cfg, ctx=shared_context(cfg)), shards)
    get_run_logger().info("wrote %d of %r in %.1f s", written, shards, time.perf_counter() - t0)
    return {"shard_ranges": shards.to_json(), "manifest_dir": str(Path(cfg.out) / MANIFEST_DIR)}


class PrefectTasks(Executor):
    """The shards as `run-shard-range` tasks of `shards_per_task` shards each (the unit of retry), one at a time
    on this node (each task on the node's executor)."""

    def __init__(self, shards_per_task: int | None = None) -> None:
        self.shards_per_task = shards_per_task

    def write(self, run: Run, shards: ShardRanges) -> None:
        cfg = run.cfg
        ranges = split_ranges(shards, self.shards_per_task or default_shards_per_task(cfg, shards))
        how = f"{cfg.processes} accelerate workers" if cfg.processes > 1 else "in-process"
        get_run_logger().info("%s: %d shard(s) to do in %d task(s) (%s)", cfg.out, len(shards), len(ranges), how)
        cfg_json = cfg.model_dump(mode="json")
        futures = [run_shard_range.submit(cfg_json, r.to_json()) for r in ranges]
        raise_first_failure(futures, ranges)


def raise_first_failure(futures: list[Any], ranges: list[ShardRanges]) -> None:
    """Wait for the futures; log which ranges failed and raise the first failure (a re-run resumes them)."""
    wait(futures)
    failed = [r for f, r in zip(futures, ranges, strict=True) if not f.state.is_completed()]
    if failed:
        get_run_logger().error(
            "%d task(s) failed (%s); re-run the flow to resume",
            len(failed),
            ShardRanges(p for r in failed for p in r.ranges),
        )
        next(f for f in futures if not f.state.is_completed()).result()  # raises the task's exception


# ------------------------------------------------------------------------------------------- flow


def split_ranges(shards: ShardRanges, size: int) -> list[ShardRanges]:
    """Consecutive parts of at most `size` shards (each one a few ranges, whatever `size`)."""
    if size < 1:
        raise ValueError(f"shards_per_task must be >= 1, got {size}")
    return shards.chunks(size)


def default_shards_per_task(cfg: AugmentConfig, pending: ShardRanges) -> int:
    """In-process: one shard per task (finest retries). K workers: all pending shards in one launch
    (each launch loads the model K times; a retry resumes from the done markers anyway)."""
    return max(1, len(pending)) if cfg.processes > 1 else 1


def per_run_folder(out: str) -> str:
    """`<out>/<scheduled start, UTC, YYYYmmddTHHMMZ>`: one dataset per scheduled run; a retry or a
    re-run of the same flow run resumes the same folder."""
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time.astimezone(UTC)
    return str(Path(out) / when.strftime("%Y%m%dT%H%MZ"))


@flow(
    name="augment",
    task_runner=ThreadPoolTaskRunner(max_workers=1),
    description="MMD-guided synthetic data: references -> WebDataset shards + Parquet manifest.",
)
def augment(config: AugmentConfig, shards_per_task: int | None = None, per_run_output: bool = False) -> dict[str, Any]:
    """Run (or resume) an augment job as Prefect tasks.

    Args:
        config: the job, exactly as the CLI builds it (`augment --config job.json` takes the same JSON).
        shards_per_task: shards per `run-shard-range` task (the unit of retry); default: 1 in-process,
            all pending shards with K accelerate workers.
        per_run_output: write into `<config.out>/<scheduled start time>` (for schedules: a new dataset
            per run from the references as they are then).

    Tasks run one at a time on this node (one model, all its GPUs per task); many nodes: `fanout.py`.
    """
    cfg = config.model_copy(update={"out": per_run_folder(config.out)}) if per_run_output else config
    return run_flow_job(cfg, PrefectTasks(shards_per_task))


def run_flow_job(cfg: AugmentConfig, executor: Executor) -> dict[str, Any]:
    """The references (cached task), then the run: start, execute on `executor`, finish and publish."""
    ref_state = reference_task(cfg)(cfg.model_dump(mode="json"), return_state=True)
    reference = ref_state.result()
    run = start_run(cfg)
    with run.holding():  # a failure from here on gives the folder back (its claim if no sample was written)
        if reference["content_hash"] != run.ctx.bundle.content_hash:
            get_run_logger().warning("references changed while the flow started; using the ones read last")
        run.execute(executor)
        return finish_and_publish(run, ref_state, reference, **executor.report())


def finish_and_publish(run: Run, ref_state: Any, reference: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Merge the manifest, write run.json, publish the summary artifact; a small, serialisable result.

    Raises:
        FinishedShort: after all of that, if the run kept fewer than --n samples (the flow run ends
            Failed) and `allow_shortfall` does not accept it.
    """
    cfg = run.cfg
    summary = run.finish()
    result = {
        "out": cfg.out,
        "manifest": str(run.folder.manifest_path),
        "run_record": str(Path(cfg.out) / "run.json"),
        "shards": [str(run.folder.shard_path(s.shard_id)) for s in run.plan.shards],
        **extra,
        "config_hash": summary.config_hash,
        "num_kept": summary.num_kept,
        "num_generated": summary.num_generated,
        "shortfall": summary.shortfall,
        "shards_written": summary.shards_written,
        "shards_skipped": summary.shards_skipped,
        "mmd2_pool": summary.mmd2_pool,
        "mmd2_kept": summary.mmd2_kept,
        "reference_cached": ref_state.name == "Cached",
        "seconds": summary.seconds,
    }
    publish_summary(result, reference)
    check_delivered(cfg, summary)
    return result


def summary_rows(result: dict[str, Any], reference: dict[str, Any]) -> list[dict[str, str]]:
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.5f}"

    pool, kept = result["mmd2_pool"], result["mmd2_kept"]
    ratio = f"{kept / pool:.3f}" if pool and kept is not None else "n/a"
    rows = [
        ("output", result["out"]),
        ("config hash", result["config_hash"]),
        ("samples kept / generated", f"{result['num_kept']} / {result['num_generated']}"),
        ("samples short of --n", str(result.get("shortfall", 0))),
        ("shards written / already done", f"{result['shards_written']} / {result['shards_skipped']}"),
        ("MMD² pool (before filter)", fmt(pool)),
        ("MMD² kept (after filter)", fmt(kept)),
        ("MMD² kept / pool", ratio),
        ("references", f"{reference['count']} ({reference['content_hash'][:12]})"),
        ("model", reference["model_id"]),
        ("reference bundle", "cached" if result["reference_cached"] else "computed"),
    ]
    rows += [(f"seconds: {k}", f"{v:.1f}") for k, v in result["seconds"].items()]
    return [{"metric": k, "value": str(v)} for k, v in rows]


def publish_summary(result: dict[str, Any], reference: dict[str, Any]) -> None:
    """The run summary as a table artifact and a markdown artifact (keys: one per config hash)."""
    rows = summary_rows(result, reference)
    key = f"augment-{result['config_hash']}"
    create_table_artifact(rows, key=key, description=f"augment run summary: {result['out']}")
    lines = ["| metric | value |", "| --- | --- |", *(f"| {r['metric']} | `{r['value']}` |" for r in rows)]
    create_markdown_artifact(
        "## augment run summary\n\n" + "\n".join(lines) + f"\n\nManifest: `{result['manifest']}`\n",
        key=f"{key}-report",
        description="augment run summary (markdown)",
    )
