"""The whole `augment` job as plain functions: prepare, plan, run shards (in-process or K workers), finish.

The shards run on an executor of `pipeline.executors`: in-process (one CPU or GPU), or `accelerate
launch` of K worker processes on the node, each owning whole shards (`split_between_processes` over
pending shard ids; no gather of images).
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from storage.manifest import merge_manifest, read_manifest
from storage.run_record import check_or_claim_output, check_or_record_inputs, write_run_record
from storage.shards import clean_partial, is_done, read_marker

from . import __version__
from .config import AugmentConfig
from .executors import launch_workers, run_shards_in_process
from .models.loading import LoadedModel, load_model
from .plan import JobPlan, class_proportions, plan_job
from .reference import ReferenceBundle, build_target, check_references, prepare_reference
from .worker import JobContext, ShardResult, model_label_map

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}


@dataclass
class JobSummary:
    out: str
    config_hash: str
    num_kept: int
    num_generated: int
    shards_written: int
    shards_skipped: int
    mmd2_pool: float | None
    mmd2_kept: float | None
    seconds: dict[str, float] = field(default_factory=dict)


def with_sampler(model: LoadedModel, sampler: str) -> LoadedModel:
    """The model's noise schedule under the chosen diffusers sampler."""
    model.scheduler = SCHEDULERS[sampler].from_config(model.scheduler.config)
    return model


def build_context(cfg: AugmentConfig, model: LoadedModel | None = None) -> JobContext:
    """Load the model, prepare the reference bundle (validating the references) and the MMD target.

    The references are checked before the model is loaded: an input error comes first, and alone.
    """
    if model is None:
        check_references(cfg)
        model = load_model(cfg.model, cfg.device, cfg.dtype)
    model = with_sampler(model, cfg.sampler)
    bundle = prepare_reference(cfg, model)
    target = build_target(cfg, bundle, model.device)
    props = class_proportions(bundle.labels, bundle.num_classes or 0, cfg.class_balance)
    labels_map = model_label_map(bundle.class_names, model.num_classes)
    if bundle.class_names is not None:
        how = "model labels " + str(labels_map) if labels_map else "the product kernel only (model not told)"
        log.info("classes %s steered by %s", bundle.class_names, how)
    return JobContext(cfg, model, bundle, target, props, labels_map)


def pending_shards(cfg: AugmentConfig, plan: JobPlan) -> list[int]:
    return [s.shard_id for s in plan.shards if not is_done(cfg.out, cfg.prefix, s.shard_id)]


def start_job(cfg: AugmentConfig, model: LoadedModel | None = None) -> tuple[JobContext, JobPlan, list[int]]:
    """Validate and encode the references, claim the output folder, clean crashed writes, plan.

    Returns the context, the plan and the ids of the shards still to do. Bad references fail here,
    before anything is written to `cfg.out`.
    """
    ctx = build_context(cfg, model)
    check_or_claim_output(cfg.out, cfg.config_hash, cfg.hashed_fields())
    record_inputs(cfg.out, ctx.bundle)
    clean_partial(cfg.out)
    plan = plan_job(cfg)
    pending = pending_shards(cfg, plan)
    if len(pending) < len(plan.shards):
        log.info("resuming: %d of %d shards already done", len(plan.shards) - len(pending), len(plan.shards))
    return ctx, plan, pending


def record_inputs(out: str, bundle: ReferenceBundle) -> None:
    """The same settings with other references or another model must not resume into this folder."""
    check_or_record_inputs(out, {"reference_content_hash": bundle.content_hash, "model_id": bundle.model_id})


def finish_job(
    cfg: AugmentConfig, model: LoadedModel, bundle: ReferenceBundle, plan: JobPlan, written: int, seconds: dict
) -> JobSummary:
    """Merge the manifest parts (every shard must be done) and write run.json."""
    merge_manifest(cfg.out, expected_shards=[s.shard_id for s in plan.shards])
    summary = summarize(cfg, plan, written, len(plan.shards) - written, seconds)
    write_run_record(cfg.out, run_record(cfg, model, bundle, plan, summary))
    return summary


def run_job(
    cfg: AugmentConfig,
    *,
    model: LoadedModel | None = None,
    progress: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> JobSummary:
    """Run (or resume) the whole job: start, run pending shards (in-process or K workers), finish."""
    t0 = time.perf_counter()
    ctx, plan, pending = start_job(cfg, model)
    t1 = time.perf_counter()
    if progress is not None:
        progress(sum(s.num_kept for s in plan.shards if s.shard_id not in pending))
    if cfg.processes > 1 and pending:
        launch_workers(cfg, pending, progress)
    else:
        run_shards_in_process(ctx, plan, pending, _kept_progress(plan, progress), on_shard)
    t2 = time.perf_counter()
    seconds = {"prepare": round(t1 - t0, 3), "generate_filter_write": round(t2 - t1, 3)}
    summary = finish_job(cfg, ctx.model, ctx.bundle, plan, len(pending), seconds)
    summary.seconds["total"] = round(time.perf_counter() - t0, 3)
    return summary


def _kept_progress(plan: JobPlan, progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
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


def summarize(cfg: AugmentConfig, plan: JobPlan, written: int, skipped: int, seconds: dict) -> JobSummary:
    """Counts from the manifest; MMD² (V-statistic, latent space) of pool and kept set, mean over shards."""
    table = read_manifest(Path(cfg.out) / "manifest.parquet")
    markers = [read_marker(cfg.out, cfg.prefix, s.shard_id) or {} for s in plan.shards]
    pool = [m["mmd2_pool"] for m in markers if "mmd2_pool" in m]
    kept = [m["mmd2_kept"] for m in markers if "mmd2_kept" in m]
    return JobSummary(
        out=cfg.out,
        config_hash=cfg.config_hash,
        num_kept=table.filter(table["kept"]).num_rows,
        num_generated=table.num_rows,
        shards_written=written,
        shards_skipped=skipped,
        mmd2_pool=sum(pool) / len(pool) if pool else None,
        mmd2_kept=sum(kept) / len(kept) if kept else None,
        seconds=dict(seconds),
    )


def run_record(cfg: AugmentConfig, model: LoadedModel, bundle: ReferenceBundle, plan: JobPlan, summary) -> dict:
    import diffusers

    return {
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash,
        "model_id": model.model_id,
        "reference": {
            "files": bundle.files,
            "heldout_files": bundle.heldout_files,
            "content_hash": bundle.content_hash,
            "count": len(bundle.latents),
            "class_names": bundle.class_names,
            "bandwidth": bundle.bandwidth,
        },
        "plan": {"shards": len(plan.shards), "generated": plan.num_generated, "kept": plan.num_kept},
        "summary": asdict(summary),
        "versions": {
            "mmd-augment": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }
