"""What one process does: generate a shard's pool with guidance, filter it, write it.

A shard is the unit of work, of filtering and of resumption: its pool of ⌈kept/keep⌉ samples is
generated batch by batch (batches are fixed slices of the shard's global indices), every sample is
scored by its exact leave-one-out contribution to MMD² against the references, the best `kept` are
kept, and the shard is written atomically with its manifest part; the done marker comes last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guidance import (
    Kernel,
    MMDGuidance,
    MMDTarget,
    ProductKernel,
    SampleMemory,
    StrengthSchedule,
    mmd2,
    mmd_contributions,
    nearest_reference_distance,
)
from storage.manifest import write_manifest_part
from storage.shards import encode_png, write_shard

from .config import AugmentConfig
from .models.loading import LoadedModel
from .plan import ShardPlan, assign_classes, seeds_for
from .reference import ReferenceBundle
from .sampling import sample_latents

log = logging.getLogger(__name__)

#: Called with the number of samples just finished (generated, for the progress bar).
Progress = Callable[[int], None]


@dataclass
class JobContext:
    """What every shard of a job shares (built once per process)."""

    cfg: AugmentConfig
    model: LoadedModel
    bundle: ReferenceBundle
    target: MMDTarget
    proportions: torch.Tensor | None
    model_labels: dict[int, int] | None  # reference class id -> model class id (None: model not told)
    worker: str = "main"  # which process wrote a shard (recorded in its done marker)


@dataclass
class ShardResult:
    shard_id: int
    num_generated: int
    num_kept: int
    mmd2_pool: float
    mmd2_kept: float
    seconds: dict[str, float] = field(default_factory=dict)


def model_label_map(class_names: list[str] | None, num_model_classes: int | None) -> dict[int, int] | None:
    """Class folders named by integers the model knows ("0".."9" for the shipped prior) become model
    labels, so a class-conditional model is asked for that class; otherwise only the kernel steers."""
    if class_names is None or num_model_classes is None:
        return None
    try:
        ids = [int(name) for name in class_names]
    except ValueError:
        return None
    if any(not 0 <= i < num_model_classes for i in ids):
        return None
    return dict(enumerate(ids))


def make_guidance(cfg: AugmentConfig, target: MMDTarget) -> MMDGuidance | None:
    if cfg.guidance == "none" or cfg.strength == 0:
        return None
    kind = (
        "interval" if cfg.schedule == "constant" and (cfg.schedule_start, cfg.schedule_end) != (0, 1) else cfg.schedule
    )
    schedule = StrengthSchedule(cfg.strength, kind=kind, start=cfg.schedule_start, end=cfg.schedule_end)
    return MMDGuidance(
        target,
        schedule,
        mode=cfg.guidance,
        normalization=cfg.normalization,
        lookahead_steps=cfg.lookahead_steps,
        memory=SampleMemory(cfg.memory) if cfg.memory else None,
    )


def generate_pool(ctx: JobContext, shard: ShardPlan, progress: Progress | None = None):
    """(latents [n, C, H, W] float32 on CPU, target labels [n] or None) for a shard's whole pool."""
    cfg, model = ctx.cfg, ctx.model
    labels = assign_classes(cfg, shard, ctx.proportions)
    guidance = make_guidance(cfg, ctx.target)  # fresh memory per shard: output independent of process count
    product = isinstance(ctx.target.kernel, ProductKernel)
    sequential = cfg.coupling == "sequential"
    if sequential and guidance is not None and guidance.memory is None:
        guidance.memory = SampleMemory(100)
    out = []
    offset = 0
    for batch in shard.batches(1 if sequential else cfg.batch_size):
        if sequential and guidance is not None and len(guidance.memory) >= guidance.memory.capacity:
            guidance.memory.clear()  # the public code resets its memory bank every `capacity` samples
        lab = labels[offset : offset + len(batch)] if labels is not None else None
        condition = None
        if lab is not None and ctx.model_labels is not None:
            condition = torch.tensor([ctx.model_labels[int(c)] for c in lab], device=model.device)
        result = sample_latents(
            model.denoiser,
            model.scheduler,
            seeds_for(cfg, batch),
            num_steps=cfg.steps,
            condition=condition,
            cfg_scale=cfg.cfg_scale,
            ig_scale=cfg.ig_scale,
            ig_interval=cfg.ig_interval,
            guidance=guidance,
            mmd_condition=lab.to(model.device) if (product and lab is not None) else None,
            eta=cfg.eta,
            device=model.device,
        )
        out.append(result.latents.cpu())
        offset += len(batch)
        if progress is not None:
            progress(len(batch))
    return torch.cat(out), labels


#: A sample farther than this many median reference distances (the RBF bandwidth) from its nearest
#: reference is outside the references' support: the filter ranks it last (see nearest_reference_distance).
SUPPORT_RADIUS = 3.0


def filter_pool(ctx: JobContext, latents: torch.Tensor, labels: torch.Tensor | None, num_kept: int):
    """(scores [n], kept mask [n], rank [n], nearest-reference distance [n]): keep the `num_kept` samples
    with the lowest leave-one-out contributions, samples outside the references' support last."""
    scores = mmd_contributions(latents, ctx.bundle.latents, unbiased=True, **_kernel_args(ctx, labels)).double()
    nearest = nearest_reference_distance(latents, ctx.bundle.latents)
    rank, outside = rank_pool(scores, nearest, ctx.bundle.bandwidth)
    if bool(outside.any()):
        log.warning(
            "%d of %d samples lie outside the references' support (nearest reference > %g x the median "
            "reference distance %.4g): ranked last by the filter",
            int(outside.sum()),
            len(outside),
            SUPPORT_RADIUS,
            ctx.bundle.bandwidth,
        )
    if len(scores) > 1 and float(scores.max() - scores.min()) == 0.0:
        log.warning(
            "all %d MMD contributions are equal (samples far outside the kernel's reach of the references?): "
            "the filter keeps the first samples by index",
            len(scores),
        )
    return scores, rank < num_kept, rank, nearest


def rank_pool(scores: torch.Tensor, nearest: torch.Tensor, bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, outside): rank 0 = most helpful, ascending leave-one-out contribution with samples outside
    the references' support (nearest reference > SUPPORT_RADIUS × bandwidth) last; ties by index."""
    outside = nearest > SUPPORT_RADIUS * bandwidth
    order = torch.argsort(torch.where(outside, torch.inf, scores), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank, outside


def to_png(image: torch.Tensor) -> bytes:
    """[C, H, W] in [−1, 1] -> lossless PNG bytes (8-bit grayscale or RGB), deterministic."""
    return encode_png(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


def sample_key(prefix: str, index: int) -> str:
    """Unique across the dataset, no dots: `{prefix}_{index:09d}`."""
    return f"{prefix}_{index:09d}"


def run_shard(ctx: JobContext, shard: ShardPlan, progress: Progress | None = None) -> ShardResult:
    """Generate, filter and write one shard (manifest part first, shard + done marker last)."""
    cfg, model, bundle = ctx.cfg, ctx.model, ctx.bundle
    t0 = time.perf_counter()
    latents, labels = generate_pool(ctx, shard, progress)
    t1 = time.perf_counter()
    scores, kept, rank, nearest = filter_pool(ctx, latents, labels, shard.num_kept)
    t2 = time.perf_counter()
    write_idx = torch.arange(len(latents)) if cfg.keep_rejected else kept.nonzero().flatten()
    images = model.decode(latents[write_idx].to(model.device), batch_size=cfg.batch_size)
    t3 = time.perf_counter()
    seeds = seeds_for(cfg, shard.indices)
    guidance_meta = {
        "mode": cfg.guidance,
        "kernel": cfg.kernel,
        "strength": cfg.strength,
        "schedule": cfg.schedule,
        "normalization": cfg.normalization,
        "cfg_scale": cfg.cfg_scale,
        "ig_scale": cfg.ig_scale,
        "steps": cfg.steps,
        "sampler": cfg.sampler,
    }
    rows: list[dict[str, Any]] = []
    kept_samples: list[dict[str, Any]] = []
    rejected_samples: list[dict[str, Any]] = []
    pos = {int(j): k for k, j in enumerate(write_idx)}
    for j, index in enumerate(shard.indices):
        label = int(labels[j]) if labels is not None else None
        class_name = bundle.class_names[label] if label is not None else None
        row = {
            "key": sample_key(cfg.prefix, index),
            "index": index,
            "shard": shard.shard_id,
            "seed": seeds[j],
            "label": label,
            "class_name": class_name,
            "condition": class_name,
            "mmd_contribution": float(scores[j]),
            # 5 significant digits: latents agree across process/thread counts only to float32 rounding
            "nearest_reference_distance": float(f"{float(nearest[j]):.5g}"),
            "kept": bool(kept[j]),
            "rank_in_shard": int(rank[j]),
            "config_hash": cfg.config_hash,
            "model_id": model.model_id,
        }
        rows.append(row)
        if j not in pos:
            continue
        meta = dict(row, guidance=guidance_meta)
        sample: dict[str, Any] = {"__key__": row["key"], "png": to_png(images[pos[j]]), "json": meta}
        if label is not None:
            sample["cls"] = label
        if cfg.save_latents:
            sample["latent.npy"] = np.ascontiguousarray(latents[j].numpy())
        (kept_samples if kept[j] else rejected_samples).append(sample)
    if cfg.keep_rejected:
        write_shard(cfg.out, f"{cfg.prefix}_rejected", shard.shard_id, rejected_samples)
    write_manifest_part(cfg.out, shard.shard_id, rows)
    result = ShardResult(
        shard_id=shard.shard_id,
        num_generated=len(latents),
        num_kept=int(kept.sum()),
        mmd2_pool=_mmd2(ctx, latents, labels),
        mmd2_kept=_mmd2(ctx, latents[kept], labels[kept] if labels is not None else None),
    )
    write_shard(
        cfg.out,
        cfg.prefix,
        shard.shard_id,
        kept_samples,
        marker_info={
            "count": len(kept_samples),
            "config_hash": cfg.config_hash,
            "mmd2_pool": result.mmd2_pool,
            "mmd2_kept": result.mmd2_kept,
            "worker": ctx.worker,
        },
    )
    t4 = time.perf_counter()
    result.seconds = {"generate": t1 - t0, "filter": t2 - t1, "decode": t3 - t2, "write": t4 - t3}
    return result


def _kernel_args(ctx: JobContext, labels: torch.Tensor | None) -> dict:
    """The job's kernel and, for the product kernel, the sample and reference conditions."""
    product = isinstance(ctx.target.kernel, ProductKernel)
    return {
        "kernel": ctx.target.kernel,
        "x_cond": labels if product else None,
        "y_cond": ctx.bundle.labels if product else None,
    }


def _mmd2(ctx: JobContext, latents: torch.Tensor, labels: torch.Tensor | None) -> float:
    return mmd2_to_references(latents, labels, ctx.bundle, ctx.target.kernel)


def mmd2_to_references(
    latents: torch.Tensor, labels: torch.Tensor | None, bundle: ReferenceBundle, kernel: Kernel | ProductKernel
) -> float:
    """MMD²_V of a set of samples to the references (the shard summary: pool and kept set), in float64.

    A V-statistic of a positive-definite kernel is ≥ 0; float64 keeps it so for pools holding blown-up
    samples (latent norms of 1e8 occur), where float32 cancellation in ‖x‖² + ‖y‖² − 2xᵀy does not.
    """
    product = isinstance(kernel, ProductKernel)
    value = mmd2(
        latents.double(),
        bundle.latents.double(),
        kernel,
        unbiased=False,
        x_cond=labels if product else None,
        y_cond=bundle.labels if product else None,
    )
    return float(value)
