"""What one process does: generate a shard's pool with guidance, filter it, write it.

A shard is the unit of work, of filtering and of resumption. Its planned pool of ⌈kept/keep⌉ samples is
generated batch by batch (batches are fixed slices of the shard's global indices). Then the filter:

1. a sample outside the references' support (latent distance to the nearest reference above
   `support_radius` × the median reference distance: MMD gives every such sample the same neutral score,
   and it decodes to no image of the target domain) is **rejected, never kept to fill a quota**; so is,
   with `label_filter`, a sample the label judge assigns to another class than its target;
2. each class keeps its planned share of the shard (`plan.class_quotas` of the kept count): if a class
   has fewer acceptable samples than its quota, the shard generates more of that class from its
   **reserved indices** (`plan.reserved_index`: a fixed block per shard, disjoint from every primary
   index), round by round, up to the cap `reserve` × the pool; a shard that still falls short keeps
   fewer samples and warns;
3. within each class the acceptable samples with the lowest exact leave-one-out contributions to MMD²
   against the references are kept.

Everything is a pure function of the config and the shard id, so the output is byte-identical whatever
the number of processes and across resumes. The shard is written atomically with its manifest part; the
done marker comes last.

A shard's work is named steps, which `run_shard` chains and benchmarks reuse (`benchmarks/methods_study.py`
runs `filter_shard` on its own settings):

    generate_pool      the planned pool's latents and target classes (`generate_latents`: the job's generation)
    filter_shard       generate_pool, support and label judgements, extra samples from the reserve,
                       `pool_scores` (leave-one-out MMD² contributions), `select_kept`
    decode_and_judge   the images to write, and the report-only label judge
    rows_and_samples   the manifest rows (every generated sample) and the webdataset samples (kept, rejected)
    write_shard        the rejected audit shard, the manifest part, the shard and its done marker (`RunFolder`)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guidance import Kernel, MMDTarget, ProductKernel, mmd2, mmd_contributions, nearest_reference_distance
from storage.run_folder import RunFolder
from storage.shards import encode_png

from ..checks.fidelity import LabelJudge, label_filter_on
from ..checks.reference import ReferenceBundle, outside_support
from ..config import AugmentConfig
from ..models import generation
from ..models.generation import Progress, cfg_scale_for, kernel_conditions, sampler_name
from ..models.loading import LoadedModel
from ..models.prompts import SamplePrompts
from ..plan import ShardPlan, assign_classes, class_quotas, reserve_per_shard, reserved_index, seeds_for

log = logging.getLogger(__name__)

#: Above this fraction of rejected samples in a shard the worker warns and says what to change.
HIGH_REJECTION = 0.10

#: The smallest cap on extra samples of a shard (tiny final shards still get room to replace rejects).
MIN_RESERVE = 16


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
    judge: LabelJudge | None = None  # labelled runs: who says which class a sample shows
    pilot: dict[str, Any] | None = None  # `--strength auto`: the pilot's record (its "chosen" strength)
    reach: dict[str, Any] | None = None  # the reach check's record (`pipeline.checks.reach`), when it ran
    prompts: SamplePrompts | None = None  # text-to-image models: each sample's prompt (None: unprompted)

    @property
    def strength(self) -> float:
        """The guidance strength the samples are made with (the pilot's choice under `--strength auto`)."""
        if self.cfg.strength != "auto":
            return float(self.cfg.strength)
        if self.pilot is None:
            raise RuntimeError("strength 'auto' has no pilot result: build the context with pipeline.jobs.job")
        return float(self.pilot["chosen"])


@dataclass
class ShardResult:
    shard_id: int
    num_generated: int
    num_kept: int
    mmd2_pool: float
    mmd2_kept: float | None  # None when nothing was kept
    seconds: dict[str, float] = field(default_factory=dict)
    num_outside: int = 0
    num_label_rejected: int = 0
    num_reserved: int = 0  # extra samples drawn from the shard's reserved indices
    shortfall: int = 0  # planned kept samples the shard could not fill within its cap


def generate_latents(
    ctx: JobContext,
    indices: Sequence[int],
    labels: torch.Tensor | None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """`pipeline.models.generation.generate` with the job's config, model, target, strength and model labels."""
    return generation.generate(
        ctx.cfg, ctx.model, ctx.target, ctx.strength, ctx.model_labels, indices, labels, progress, ctx.prompts
    )


def generate_pool(ctx: JobContext, shard: ShardPlan, progress: Progress | None = None):
    """(latents [n, C, H, W] float32 on CPU, target labels [n] or None) for a shard's planned pool."""
    labels = assign_classes(ctx.cfg, shard, ctx.proportions)
    return generate_latents(ctx, shard.indices, labels, progress), labels


# ------------------------------------------------------------------------------------------------ filter


def pool_scores(
    ctx: JobContext, latents: torch.Tensor, labels: torch.Tensor | None, indices: Sequence[int] | None = None
) -> torch.Tensor:
    """Each sample's exact leave-one-out contribution to MMD² of the pool against the references [n]
    (`indices`: the samples' global indices, which give their prompts; default 0..n−1).

    Unbiased (U-statistic) for pools of 3 or more; a pool of 2 uses the V-statistic (the U-statistic's
    leave-one-out needs 3); a single sample has nothing to be compared with and scores 0.
    """
    n = len(latents)
    if n < 2:
        return torch.zeros(n, dtype=torch.float64)
    indices = range(n) if indices is None else indices
    kernel_args = _kernel_args(ctx, labels, indices)
    return mmd_contributions(latents, ctx.bundle.latents, unbiased=n >= 3, **kernel_args).double()


def select_kept(
    scores: torch.Tensor, acceptable: torch.Tensor, labels: torch.Tensor | None, quotas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [n] bool, rank [n]): per class c, the `quotas[c]` acceptable samples with the lowest scores.

    Unacceptable samples are never kept, whatever the quota. rank 0 = most helpful: acceptable samples
    by ascending score, then the unacceptable ones; ties by position. Unlabelled pools are one class.
    """
    n = len(scores)
    classes = labels if labels is not None else torch.zeros(n, dtype=torch.long)
    order = torch.argsort(torch.where(acceptable, scores.double(), torch.inf), stable=True)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    kept = torch.zeros(n, dtype=torch.bool)
    for c, quota in enumerate(quotas.tolist()):
        members = order[(classes[order] == c) & acceptable[order]]
        kept[members[: int(quota)]] = True
    return kept, rank


def shard_quotas(ctx: JobContext, num_kept: int) -> torch.Tensor:
    """Kept samples per class of a shard (the plan's proportions), or [num_kept] for an unlabelled run."""
    if ctx.proportions is None:
        return torch.tensor([num_kept])
    return class_quotas(ctx.proportions, num_kept)


def extra_request(deficit: torch.Tensor, acceptable: torch.Tensor, total: torch.Tensor, room: int) -> torch.Tensor:
    """How many extra samples of each class to generate next: deficit / (that class's acceptance rate so
    far, at least 1/4), rounded up, at most `room` in all (classes in id order)."""
    rate = torch.where(total > 0, acceptable.double() / total.clamp_min(1), torch.ones_like(total, dtype=torch.float64))
    want = torch.ceil(deficit.clamp_min(0) / rate.clamp_min(0.25)).long()
    out = torch.zeros_like(want)
    left = room
    for c in range(len(want)):
        out[c] = min(int(want[c]), left)
        left -= int(out[c])
    return out


@dataclass
class FilteredPool:
    latents: torch.Tensor  # [n, C, H, W] every generated sample: the planned pool, then the extra ones
    indices: list[int]  # global index of each
    labels: torch.Tensor | None  # target class of each
    scores: torch.Tensor  # leave-one-out contribution
    nearest: torch.Tensor  # latent distance to the nearest reference
    outside: torch.Tensor  # bool: outside the references' support
    label_rejected: torch.Tensor  # bool: the judge assigns another class (label_filter only)
    judged: torch.Tensor | None  # judged class (−2: not judged) for labelled runs
    kept: torch.Tensor
    rank: torch.Tensor
    quotas: torch.Tensor
    images: dict[int, torch.Tensor]  # decoded images by position (those decoded so far)

    @property
    def shortfall(self) -> int:
        return int(self.quotas.sum()) - int(self.kept.sum())


def filter_shard(ctx: JobContext, shard: ShardPlan, progress: Progress | None = None) -> FilteredPool:
    """Generate the shard's pool, then extra samples from its reserved indices until every class has its
    quota of acceptable samples (or the cap is reached), and choose the kept ones (see the module doc)."""
    cfg, bundle = ctx.cfg, ctx.bundle
    latents, labels = generate_pool(ctx, shard, progress)
    indices = list(shard.indices)
    quotas = shard_quotas(ctx, shard.num_kept)
    num_classes = len(quotas)
    use_judge = label_filter_on(cfg.label_filter, ctx.judge) and labels is not None
    images: dict[int, torch.Tensor] = {}

    def assess(lat: torch.Tensor, lab: torch.Tensor | None, first: int):
        nearest = nearest_reference_distance(lat, bundle.latents)
        outside = outside_support(nearest, bundle.bandwidth, cfg.support_radius)
        judged = None
        mismatch = torch.zeros(len(lat), dtype=torch.bool)
        if use_judge:
            imgs = None
            if ctx.judge.needs_images:
                imgs = ctx.model.decode(lat.to(ctx.model.device), batch_size=cfg.batch_size)
                images.update({first + k: imgs[k] for k in range(len(lat))})
            judged = ctx.judge(lat, imgs)
            mismatch = judged != lab
        return nearest, outside, judged, mismatch

    nearest, outside, judged, mismatch = assess(latents, labels, 0)
    cap = _shard_cap(cfg, shard)
    used = 0
    while True:
        classes = labels if labels is not None else torch.zeros(len(latents), dtype=torch.long)
        ok = ~outside & ~mismatch
        have = torch.bincount(classes[ok], minlength=num_classes)
        total = torch.bincount(classes, minlength=num_classes)
        deficit = quotas - have
        if int(deficit.clamp_min(0).sum()) == 0 or used >= cap:
            break
        request = extra_request(deficit, have, total, cap - used)
        extra_labels = torch.repeat_interleave(torch.arange(num_classes), request)
        extra_indices = [reserved_index(cfg, shard.shard_id, used + k) for k in range(len(extra_labels))]
        log.info(
            "shard %d: %d of %d samples rejected; generating %d more from its reserved indices",
            shard.shard_id,
            int((~ok).sum()),
            len(ok),
            len(extra_indices),
        )
        extra = generate_latents(ctx, extra_indices, extra_labels if labels is not None else None)
        e_nearest, e_outside, e_judged, e_mismatch = assess(
            extra, extra_labels if labels is not None else None, len(latents)
        )
        latents = torch.cat([latents, extra])
        indices += extra_indices
        labels = torch.cat([labels, extra_labels]) if labels is not None else None
        nearest, outside = torch.cat([nearest, e_nearest]), torch.cat([outside, e_outside])
        mismatch = torch.cat([mismatch, e_mismatch])
        judged = torch.cat([judged, e_judged]) if judged is not None else None
        used += len(extra_indices)

    scores = pool_scores(ctx, latents, labels, indices)
    kept, rank = select_kept(scores, ~outside & ~mismatch, labels, quotas)
    return FilteredPool(
        latents, indices, labels, scores, nearest, outside, mismatch, judged, kept, rank, quotas, images
    )


def _shard_cap(cfg: AugmentConfig, shard: ShardPlan) -> int:
    """The most extra samples this shard may draw: `reserve` × its pool, at least MIN_RESERVE (tiny final
    shards), never more than its reserved block."""
    if cfg.reserve == 0:
        return 0
    return min(reserve_per_shard(cfg), max(math.ceil(cfg.reserve * shard.num_generated - 1e-9), MIN_RESERVE))


def _warn_rejections(ctx: JobContext, shard: ShardPlan, pool: FilteredPool) -> None:
    cfg, n = ctx.cfg, len(pool.latents)
    rejected = int((pool.outside | pool.label_rejected).sum())
    advice = (
        "lower --strength (or use --strength auto), try --guidance noisy, or check that the references suit the model"
    )
    if pool.shortfall > 0:
        log.warning(
            "shard %d keeps only %d of its planned %d samples: %d of %d generated were rejected (%d outside the "
            "references' support, %d judged another class) and its reserve of %d extra samples is spent; %s, "
            "or raise --reserve",
            shard.shard_id,
            int(pool.kept.sum()),
            int(pool.quotas.sum()),
            rejected,
            n,
            int(pool.outside.sum()),
            int(pool.label_rejected.sum()),
            _shard_cap(cfg, shard),
            advice,
        )
    elif rejected > HIGH_REJECTION * n:
        log.warning(
            "shard %d: %d of %d generated samples rejected (%d outside the references' support: nearest "
            "reference > %g x the median reference distance %.4g; %d judged another class); replaced from its "
            "reserved indices at extra cost; %s",
            shard.shard_id,
            rejected,
            n,
            int(pool.outside.sum()),
            cfg.support_radius,
            ctx.bundle.bandwidth,
            int(pool.label_rejected.sum()),
            advice,
        )


def to_png(image: torch.Tensor) -> bytes:
    """[C, H, W] in [−1, 1] -> lossless PNG bytes (8-bit grayscale or RGB), deterministic."""
    return encode_png(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


def sample_key(prefix: str, index: int) -> str:
    """Unique across the dataset, no dots: `{prefix}_{index:09d}`."""
    return f"{prefix}_{index:09d}"


def _reject_reason(pool: FilteredPool, j: int) -> str | None:
    if pool.kept[j]:
        return None
    if pool.outside[j]:
        return "outside_support"
    if pool.label_rejected[j]:
        return "label"
    return "rank"


def run_shard(ctx: JobContext, shard: ShardPlan, progress: Progress | None = None) -> ShardResult:
    """One shard's steps: `filter_shard` (generate the pool, judge support and labels, replace rejects from the
    reserve, score, keep), `decode_and_judge`, `rows_and_samples`, `write_shard` (manifest part first, shard and
    done marker last)."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    pool = filter_shard(ctx, shard, progress)
    _warn_rejections(ctx, shard, pool)
    t1 = time.perf_counter()
    write_idx = torch.arange(len(pool.latents)) if cfg.keep_rejected else pool.kept.nonzero().flatten()
    judged = decode_and_judge(ctx, pool, write_idx)
    t2 = time.perf_counter()
    rows, kept_samples, rejected_samples = rows_and_samples(ctx, shard, pool, judged, write_idx)
    result = write_shard(ctx, shard, pool, rows, kept_samples, rejected_samples)
    t3 = time.perf_counter()
    result.seconds = {"generate_filter": t1 - t0, "decode_judge": t2 - t1, "write": t3 - t2}
    return result


def decode_and_judge(ctx: JobContext, pool: FilteredPool, write_idx: torch.Tensor) -> torch.Tensor | None:
    """Decode the samples to write that are not decoded yet (into `pool.images`); the judged classes (−2: not
    judged), with the report-only judge run on the written samples when the filter did not judge."""
    cfg, model = ctx.cfg, ctx.model
    latents, labels = pool.latents, pool.labels
    missing = [int(j) for j in write_idx if int(j) not in pool.images]
    if missing:
        decoded = model.decode(latents[missing].to(model.device), batch_size=cfg.batch_size)
        pool.images.update({j: decoded[k] for k, j in enumerate(missing)})
    judged = pool.judged
    if labels is not None and ctx.judge is not None and judged is None and len(write_idx):
        # report-only judge: the written samples (the kept ones at least)
        judged = torch.full((len(latents),), -2, dtype=torch.long)
        imgs = torch.stack([pool.images[int(j)] for j in write_idx]) if ctx.judge.needs_images else None
        judged[write_idx] = ctx.judge(latents[write_idx], imgs)
    return judged


def _guidance_meta(ctx: JobContext) -> dict[str, Any]:
    """How the samples were guided: the `guidance` entry of every written sample's metadata."""
    cfg = ctx.cfg
    return {
        "mode": cfg.guidance,
        "kernel": cfg.kernel,
        "strength": ctx.strength,
        "strength_requested": cfg.strength,
        "schedule": cfg.schedule,
        "normalization": cfg.normalization,
        "cfg_scale": cfg_scale_for(cfg, ctx.model),
        "ig_scale": cfg.ig_scale,
        "steps": cfg.steps,
        "sampler": sampler_name(cfg.sampler, ctx.model),
    }


def rows_and_samples(
    ctx: JobContext, shard: ShardPlan, pool: FilteredPool, judged: torch.Tensor | None, write_idx: torch.Tensor
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The shard's manifest rows (every generated sample) and the samples to write: (rows, kept, rejected)."""
    cfg = ctx.cfg
    seeds = seeds_for(cfg, pool.indices)
    guidance_meta = _guidance_meta(ctx)
    rows: list[dict[str, Any]] = []
    kept_samples: list[dict[str, Any]] = []
    rejected_samples: list[dict[str, Any]] = []
    written = {int(j) for j in write_idx}
    # pseudo-classes (`pipeline.checks.pseudo`): the output stays unlabelled unless --pseudo-labels; the manifest's
    # `pseudo_class` keeps the class either way
    pseudo = ctx.bundle.pseudo_labels
    shown = not pseudo or cfg.pseudo_labels
    for j, index in enumerate(pool.indices):
        row = _manifest_row(ctx, shard, pool, judged, j, index, seeds[j], shown)
        rows.append(row)
        if j not in written:
            continue
        sample = _sample(cfg, pool, j, row, guidance_meta, pseudo, shown)
        (kept_samples if pool.kept[j] else rejected_samples).append(sample)
    return rows, kept_samples, rejected_samples


def _manifest_row(
    ctx: JobContext,
    shard: ShardPlan,
    pool: FilteredPool,
    judged: torch.Tensor | None,
    j: int,
    index: int,
    seed: int,
    shown: bool,
) -> dict[str, Any]:
    """The manifest row of the pool's sample `j` (global `index`); `shown`: its class is in the output."""
    cfg, labels, class_names = ctx.cfg, pool.labels, ctx.bundle.class_names
    label = int(labels[j]) if labels is not None else None
    class_name = class_names[label] if label is not None else None
    judged_label = None
    if judged is not None and int(judged[j]) != -2:
        judged_label = int(judged[j])
    row = {
        "key": sample_key(cfg.prefix, index),
        "index": index,
        "shard": shard.shard_id,
        "seed": seed,
        "label": label if shown else None,
        "class_name": class_name if shown else None,
        "condition": class_name if shown else None,
        "mmd_contribution": float(pool.scores[j]),
        # 5 significant digits: latents agree across process/thread counts only to float32 rounding
        "nearest_reference_distance": float(f"{float(pool.nearest[j]):.5g}"),
        "kept": bool(pool.kept[j]),
        "rank_in_shard": int(pool.rank[j]),
        "rejected_reason": _reject_reason(pool, j),
        "judged_label": judged_label,
        "reserved": j >= shard.num_generated,
        "config_hash": cfg.config_hash,
        "model_id": ctx.model.model_id,
    }
    if ctx.bundle.pseudo_labels:  # pseudo-classes: the manifest keeps the class even where the output does not
        row["pseudo_class"] = class_name
    if ctx.prompts is not None:  # text-to-image runs: the sample's prompt
        labels_j = pool.labels[j : j + 1] if pool.labels is not None else None
        row["prompt"] = ctx.prompts.texts([index], labels_j)[0]
    return row


def _sample(
    cfg: AugmentConfig,
    pool: FilteredPool,
    j: int,
    row: dict[str, Any],
    guidance_meta: dict[str, Any],
    pseudo: bool,
    shown: bool,
) -> dict[str, Any]:
    """The written sample of the pool's sample `j`: key, PNG, metadata (its manifest `row` and the guidance),
    its class (`cls`) when `shown`, its latent with --save-latents; `pseudo`: the classes are pseudo-classes."""
    label = int(pool.labels[j]) if pool.labels is not None else None
    meta = dict(row, guidance=guidance_meta)
    if pseudo and shown:
        meta["pseudo_label"] = True
    elif pseudo:  # unlabelled output: no class of any kind in the sample
        del meta["pseudo_class"]
        meta["judged_label"] = None
    sample: dict[str, Any] = {"__key__": row["key"], "png": to_png(pool.images[j]), "json": meta}
    if label is not None and shown:
        sample["cls"] = label
    if "prompt" in row:  # the webdataset convention for image-text pairs
        sample["txt"] = row["prompt"]
    if cfg.save_latents:
        sample["latent.npy"] = np.ascontiguousarray(pool.latents[j].numpy())
    return sample


def write_shard(
    ctx: JobContext,
    shard: ShardPlan,
    pool: FilteredPool,
    rows: list[dict[str, Any]],
    kept_samples: list[dict[str, Any]],
    rejected_samples: list[dict[str, Any]],
) -> ShardResult:
    """Write the rejected shard (--keep-rejected), the manifest part, then the shard and its done marker."""
    cfg, latents, labels, kept = ctx.cfg, pool.latents, pool.labels, pool.kept
    folder = RunFolder(cfg.out, cfg.prefix)
    if cfg.keep_rejected:
        folder.write_rejected(shard.shard_id, rejected_samples)
    folder.write_manifest_part(shard.shard_id, rows)
    result = ShardResult(
        shard_id=shard.shard_id,
        num_generated=len(latents),
        num_kept=int(kept.sum()),
        mmd2_pool=_mmd2(ctx, latents, labels, pool.indices),
        mmd2_kept=_mmd2(
            ctx,
            latents[kept],
            labels[kept] if labels is not None else None,
            [i for i, k in zip(pool.indices, kept.tolist(), strict=True) if k],
        )
        if kept.any()
        else None,
        num_outside=int(pool.outside.sum()),
        num_label_rejected=int(pool.label_rejected.sum()),
        num_reserved=len(latents) - shard.num_generated,
        shortfall=pool.shortfall,
    )
    folder.write_shard(
        shard.shard_id,
        kept_samples,
        marker_info={
            "count": len(kept_samples),
            "config_hash": cfg.config_hash,
            "mmd2_pool": result.mmd2_pool,
            "mmd2_kept": result.mmd2_kept,
            "worker": ctx.worker,
            "generated": result.num_generated,
            "reserved": result.num_reserved,
            "outside_support": result.num_outside,
            "label_rejected": result.num_label_rejected,
            "shortfall": result.shortfall,
            "judge": ctx.judge.description if ctx.judge is not None else None,
        },
    )
    return result


def _kernel_args(ctx: JobContext, labels: torch.Tensor | None, indices: Sequence[int]) -> dict:
    """The job's kernel and, for the product kernel, the samples' and the references' conditions."""
    kernel = ctx.target.kernel
    product = isinstance(kernel, ProductKernel)
    return {
        "kernel": kernel,
        "x_cond": kernel_conditions(ctx.model, kernel, ctx.prompts, indices, labels),
        "y_cond": ctx.bundle.kernel_conditions if product else None,
    }


def _mmd2(ctx: JobContext, latents: torch.Tensor, labels: torch.Tensor | None, indices: Sequence[int]) -> float:
    x_cond = kernel_conditions(ctx.model, ctx.target.kernel, ctx.prompts, indices, labels)
    return mmd2_to_references(latents, x_cond, ctx.bundle, ctx.target.kernel)


def mmd2_to_references(
    latents: torch.Tensor, x_cond: torch.Tensor | None, bundle: ReferenceBundle, kernel: Kernel | ProductKernel
) -> float:
    """MMD²_V of a set of samples to the references (the shard summary: pool and kept set), in float64;
    `x_cond` are the samples' product-kernel conditions (classes or prompt embeddings; None: plain kernel).

    A V-statistic of a positive-definite kernel is ≥ 0; float64 keeps it so for pools holding blown-up
    samples (latent norms of 1e8 occur), where float32 cancellation in ‖x‖² + ‖y‖² − 2xᵀy does not.
    """
    product = isinstance(kernel, ProductKernel)
    y_cond = bundle.kernel_conditions if product else None
    value = mmd2(
        latents.double(),
        bundle.latents.double(),
        kernel,
        unbiased=False,
        x_cond=x_cond if product else None,
        y_cond=y_cond.double() if y_cond is not None and y_cond.is_floating_point() else y_cond,
    )
    return float(value)
