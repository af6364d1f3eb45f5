"""The whole `augment` job as plain functions: prepare, plan, run shards (in-process or K workers), finish.

The shards run on an executor of `pipeline.jobs.executors`: in-process (one CPU or GPU), or `accelerate
launch` of K worker processes on the node, each owning whole shards (a contiguous share of the pending
shards, handed over as ranges; no gather of images).

A finished run that kept fewer than `--n` samples returns its summary like any other; `check_delivered`
is the verdict the CLI (exit code 3) and the flows (Failed) give it, unless `allow_shortfall`.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from storage.errors import InputError
from storage.manifest import forget_shards_without_part, manifest_rows, merge_manifest
from storage.pilot import PILOT_FILE, load_pilot, pilot_cache_path, save_pilot
from storage.reach import REACH_FILE, load_reach, save_reach
from storage.references import refuse_output_inside
from storage.run_record import (
    INPUTS_FILE,
    abandon_output,
    check_or_record_inputs,
    claim_output,
    discard_samples,
    release_output,
    write_run_record,
)
from storage.shards import clean_partial, done_shard_ids, is_done, read_marker

from .. import __version__
from ..checks.fidelity import make_judge
from ..checks.pilot import pilot_key, run_pilot
from ..checks.pseudo import assign_pseudo_classes
from ..checks.reach import reach_or_stop
from ..checks.reference import (
    ReferenceBundle,
    attach_caption_embeddings,
    build_target,
    check_references,
    default_cache_dir,
    prepare_reference,
    sample_prompts,
)
from ..config import AugmentConfig
from ..models.generation import cfg_scale_for, model_label_map, sampler_name
from ..models.loading import LoadedModel, load_model
from ..plan import JobPlan, RemainingShards, ShardRanges, class_proportions, plan_job
from .executors import launch_workers, run_shards_in_process
from .worker import JobContext, ShardResult

log = logging.getLogger(__name__)

#: What a run writes at its start besides the claim: removed again if it fails before its first sample.
RUN_RECORDS = (INPUTS_FILE, PILOT_FILE, REACH_FILE)

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
    strength: float | str | None = None  # the strength the samples were made with (the pilot's under auto)
    rejected: dict[str, int] = field(default_factory=dict)  # generated samples not kept, by reason
    reserved: int = 0  # extra samples drawn from reserved indices
    shortfall: int = 0  # planned samples no shard could fill within its cap (0: exactly --n kept)
    label_fidelity: dict | None = None  # kept samples the label judge assigns to their class (labelled runs)


class FinishedShort(RuntimeError):
    """The run finished, and wrote what it kept, the manifest and run.json, but kept fewer than `--n`
    samples (`check_delivered`; the CLI exits with code 3, a Prefect flow run ends Failed)."""

    def __init__(self, message: str, summary: JobSummary) -> None:
        super().__init__(message)
        self.summary = summary


def with_sampler(model: LoadedModel, sampler: str) -> LoadedModel:
    """The model's noise schedule under the chosen diffusers sampler (`auto`: DDIM for VP models).

    A flow-matching model keeps its own scheduler (`auto`) or takes the flow-matching Euler solver (`euler`);
    the VP samplers do not fit it.

    Raises:
        InputError: a sampler that does not fit the model.
    """
    config = model.scheduler.config
    if not model.flow_matching:
        model.scheduler = SCHEDULERS["ddim" if sampler == "auto" else sampler].from_config(config)
        return model
    own = type(model.scheduler).__name__
    if sampler == "euler" and not isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler):
        shift = config.get("flow_shift", None) or config.get("shift", 1.0)
        model.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
    elif sampler not in ("auto", "euler"):
        raise InputError(
            f"--sampler {sampler}: does not fit {model.model_id}, a flow-matching model ({model.family}); use auto "
            f"(its own {own}) or euler (FlowMatchEulerDiscreteScheduler)"
        )
    return model


def build_context(
    cfg: AugmentConfig, model: LoadedModel | None = None, *, check_reach: bool = False, pilot: bool = True
) -> JobContext:
    """Load the model, prepare the reference bundle (validating the references) and the MMD target.

    The references are checked before the model is loaded: an input error comes first, and alone. With
    `check_reach` (the job's start, not its workers) the reach check runs next (`pipeline.checks.reach`: an
    InputError when the model cannot draw the references), before the pilot (`--strength auto`; skipped
    without `pilot`, e.g. for a dry run's reach check).
    """
    refuse_output_inside(cfg.ref, cfg.out)
    if model is None:
        check_references(cfg)
        model = load_model(cfg.model, cfg.device, cfg.dtype, resolution=cfg.resolution, offload=cfg.offload)
    model = with_sampler(model, cfg.sampler)
    if cfg.ig_scale != 1.0 and not model.denoiser.supports_internal_guidance:
        raise InputError(
            f"--ig-scale {cfg.ig_scale:g}: Internal Guidance needs a model with an Internal-Guidance head, and"
            f" {model.model_id} has none; use --ig-scale 1"
        )
    # unlabelled references on a class-conditional model: the classes a judge reads in them (`pipeline.checks.pseudo`)
    bundle, _ = assign_pseudo_classes(prepare_reference(cfg, model), model, cfg)
    prompts = sample_prompts(cfg, bundle, model)
    if model.text_conditioned:
        model.denoiser.configure(cfg.negative_prompt, cfg_scale_for(cfg, model))
        if prompts is not None:
            log.info("prompts from %s: %d distinct (%s)", prompts.source, len(prompts.table), prompts.table[0][:60])
    bundle = attach_caption_embeddings(bundle, model, prompts)
    target = build_target(cfg, bundle, model.device)
    props = class_proportions(bundle.labels, bundle.num_classes or 0, cfg.class_balance)
    labels_map = model_label_map(bundle.class_names, model.num_classes)
    if bundle.class_names is not None:
        how = "model labels " + str(labels_map) if labels_map else "the product kernel only (model not told)"
        kind = "pseudo-classes" if bundle.pseudo_labels else "classes"
        log.info("%s %s steered by %s", kind, bundle.class_names, how)
    judge = make_judge(cfg.model, bundle.latents, bundle.labels, bundle.class_names)
    ctx = JobContext(cfg, model, bundle, target, props, labels_map, judge=judge, prompts=prompts)
    if check_reach:
        ctx.reach = reach_or_stop(ctx)
    if cfg.strength == "auto" and pilot:
        ctx.pilot = resolve_pilot(ctx)
    return ctx


def resolve_pilot(ctx: JobContext) -> dict:
    """`--strength auto`: the pilot's record from this run folder (a resume), else from the cache (same
    references, model and settings), else run the pilot now and cache it."""
    cfg, bundle = ctx.cfg, ctx.bundle
    key = pilot_key(cfg, bundle.content_hash, bundle.model_id, bundle.files)
    cache = pilot_cache_path(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), key)
    for where in (Path(cfg.out) / PILOT_FILE, cache):
        record = load_pilot(where, key)
        if record is not None:
            log.info("strength auto: %g (pilot record %s)", record["chosen"], where)
            return record
    record = dict(run_pilot(ctx), key=key)
    save_pilot(cache, record)
    return record


def pending_shards(cfg: AugmentConfig, plan: JobPlan) -> RemainingShards:
    """Ids of the planned shards still to do, ascending: all but those whose done marker vouches for
    their bytes. Lazy: it holds the done ids only (listed from the markers), never all shard ids."""
    total = len(plan.shards)
    done = [sid for sid in done_shard_ids(cfg.out, cfg.prefix) if sid < total and is_done(cfg.out, cfg.prefix, sid)]
    return RemainingShards(total, done)


def shards_not_done(cfg: AugmentConfig, shards: ShardRanges) -> ShardRanges:
    """The shards among `shards` whose done marker does not vouch for their bytes, as ranges (the markers
    are read one at a time; memory grows with the ranges only)."""
    return ShardRanges.from_ids(sid for sid in shards if not is_done(cfg.out, cfg.prefix, sid))


def start_job(cfg: AugmentConfig, model: LoadedModel | None = None) -> tuple[JobContext, JobPlan, RemainingShards]:
    """Validate and encode the references, claim and lock the output folder, clean crashed writes, plan.

    Returns the context, the plan and the ids of the shards still to do. Bad references fail here,
    before anything is written to `cfg.out`, and so does a model that cannot draw them (the reach check);
    so does an output folder that cannot be written or that another run is writing to. This process holds
    the folder's lock until `finish_job` (or its exit).
    """
    ctx = build_context(cfg, model, check_reach=True)
    claim_output(cfg.out, cfg.config_hash, cfg.hashed_fields())
    try:
        record_inputs(cfg.out, ctx.bundle)
        if ctx.reach is not None:
            save_reach(cfg.out, ctx.reach)  # for run.json, which `finish_job` may write in another process
        if ctx.pilot is not None and load_pilot(Path(cfg.out) / PILOT_FILE, ctx.pilot["key"]) is None:
            save_pilot(Path(cfg.out) / PILOT_FILE, ctx.pilot)  # pins the choice for resumes and workers
        clean_partial(cfg.out)
        lost = forget_shards_without_part(cfg.out, cfg.prefix)
        if lost:
            log.warning("%d done shard(s) lost their manifest part (e.g. shard %d): regenerating", len(lost), lost[0])
        plan = plan_job(cfg)
        pending = pending_shards(cfg, plan)
    except BaseException:
        abandon_output(cfg.out, records=RUN_RECORDS)
        raise
    if len(pending) < len(plan.shards):
        log.info("resuming: %d of %d shards already done", len(plan.shards) - len(pending), len(plan.shards))
    return ctx, plan, pending


def pinned_pilot(cfg: AugmentConfig, bundle: ReferenceBundle) -> dict | None:
    """The pilot record this run folder pinned (`--strength auto`), else None."""
    if cfg.strength != "auto":
        return None
    return load_pilot(Path(cfg.out) / PILOT_FILE, pilot_key(cfg, bundle.content_hash, bundle.model_id, bundle.files))


def record_inputs(out: str, bundle: ReferenceBundle) -> None:
    """The same settings with other references or another model must not resume into this folder."""
    check_or_record_inputs(out, {"reference_content_hash": bundle.content_hash, "model_id": bundle.model_id})


def finish_job(
    cfg: AugmentConfig, model: LoadedModel, bundle: ReferenceBundle, plan: JobPlan, written: int, seconds: dict
) -> JobSummary:
    """Merge the manifest parts (every shard must be done), write run.json, release the folder's lock.

    A run that kept fewer than `--n` samples (`summary.shortfall`) logs a WARNING and returns its summary
    like any other; `check_delivered` is the verdict (exit code 3 of the CLI).

    Raises:
        InputError: the run kept no sample at all (every one rejected); then it removes what it wrote.
    """
    merge_manifest(cfg.out, expected_shards=range(len(plan.shards)))
    pseudo_names = bundle.class_names if bundle.pseudo_labels else None
    summary = summarize(cfg, plan, written, len(plan.shards) - written, seconds, pseudo_class_names=pseudo_names)
    pilot = pinned_pilot(cfg, bundle)
    summary.strength = cfg.strength if pilot is None else pilot["chosen"]
    if summary.shortfall:
        log.warning(
            "kept %d samples, %d fewer than --n %d: some shards ran out of reserve (see the warnings above)",
            summary.num_kept,
            summary.shortfall,
            cfg.n,
        )
    if summary.num_kept == 0:  # nothing to train on: leave nothing behind, so corrected settings can run
        reasons = rejections(summary)
        discard_samples(cfg.out)
        abandon_output(cfg.out, records=RUN_RECORDS)
        raise InputError(
            f"{cfg.out}: every one of the {summary.num_generated} generated samples was rejected ({reasons}): the "
            "model does not draw this domain at these settings; lower --strength (or use auto), check --model and "
            "the references, or widen --support-radius; nothing was kept, so nothing was written"
        )
    write_run_record(cfg.out, run_record(cfg, model, bundle, plan, summary))
    release_output(cfg.out)
    return summary


def check_delivered(cfg: AugmentConfig, summary: JobSummary) -> None:
    """Raise `FinishedShort` if the finished run kept fewer than `--n` samples, unless `allow_shortfall`
    accepts that (its WARNING is logged by `finish_job` either way). A re-run of a finished job
    re-reads the same markers, so it reports the same outcome."""
    if not summary.shortfall or cfg.allow_shortfall:
        return
    raise FinishedShort(
        f"{cfg.out}: finished short: kept {summary.num_kept} of --n {cfg.n} samples ({summary.shortfall} short; "
        f"rejected: {rejections(summary) or 'none'}; the shards' reserve ran out); the kept samples, "
        "manifest.parquet and run.json are written. For all of --n, run into a new --out with a wider "
        "--support-radius, a larger --reserve or a lower --strength; to accept these samples, rerun with "
        "--allow-shortfall",
        summary,
    )


def rejections(summary: JobSummary) -> str:
    """The rejected samples by reason, as words: `71 outside support, 3 rank`."""
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary.rejected.items())


@contextlib.contextmanager
def holding_output(cfg: AugmentConfig) -> Iterator[None]:
    """The span from `start_job` to `finish_job`, wherever the shards run (`run_job`, the Prefect flows):
    if it fails, undo this run's claim on `cfg.out` when it wrote no sample (`abandon_output`: a corrected
    re-run is then accepted); release the folder's lock however it ends."""
    try:
        yield
    except BaseException:
        abandon_output(cfg.out, records=RUN_RECORDS)  # a run that wrote no sample leaves nothing behind
        raise
    finally:
        release_output(cfg.out)


def run_job(
    cfg: AugmentConfig,
    *,
    model: LoadedModel | None = None,
    progress: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> JobSummary:
    """Run (or resume) the whole job: start, run pending shards (in-process or K workers), finish.

    Returns the summary also when the run kept fewer than `--n` (`summary.shortfall`); the CLI and the
    flows then call `check_delivered`."""
    t0 = time.perf_counter()
    ctx, plan, pending = start_job(cfg, model)
    with holding_output(cfg):
        t1 = time.perf_counter()
        if progress is not None:
            progress(sum(plan.shards[sid].num_kept for sid in pending.excluded))
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


def summarize(
    cfg: AugmentConfig,
    plan: JobPlan,
    written: int,
    skipped: int,
    seconds: dict,
    *,
    pseudo_class_names: list[str] | None = None,
) -> JobSummary:
    """Counts from the manifest; MMD² (V-statistic, latent space) of pool and kept set, mean over shards.
    Streams the manifest and the markers: memory does not grow with `n`. `pseudo_class_names`: a
    pseudo-class run's classes (what its manifest's `judged_label` ids name), for its label fidelity."""
    counts = _ManifestCounts(pseudo_class_names)
    for batch in manifest_rows(Path(cfg.out) / "manifest.parquet", counts.COLUMNS):
        counts.add(batch)
    pool, kept = _Mean(), _Mean()
    shortfall, judges = 0, set()
    for sid in range(len(plan.shards)):
        marker = read_marker(cfg.out, cfg.prefix, sid) or {}
        pool.add(marker.get("mmd2_pool"))
        kept.add(marker.get("mmd2_kept"))
        shortfall += int(marker.get("shortfall", 0))
        if marker.get("judge"):
            judges.add(marker["judge"])
    return JobSummary(
        out=cfg.out,
        config_hash=cfg.config_hash,
        num_kept=counts.kept,
        num_generated=counts.rows,
        shards_written=written,
        shards_skipped=skipped,
        mmd2_pool=pool.value,
        mmd2_kept=kept.value,
        seconds=dict(seconds),
        rejected=dict(sorted(counts.rejected.items())),
        reserved=counts.reserved,
        shortfall=shortfall,
        label_fidelity=label_fidelity(counts.per_class, judges, pseudo=counts.pseudo),
    )


class _Mean:
    """Running mean of the values given (None values skipped); `value` is None when there were none."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float | None) -> None:
        if value is not None:
            self.total += value
            self.count += 1

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class _ManifestCounts:
    """What the summary counts in the manifest, accumulated batch by batch (memory flat in `n`)."""

    COLUMNS = ("kept", "rejected_reason", "reserved", "label", "class_name", "judged_label", "pseudo_class")

    def __init__(self, pseudo_class_names: list[str] | None = None) -> None:
        self.rows = self.kept = self.reserved = 0
        self.rejected: dict[str, int] = {}
        self.per_class: dict[str, dict] = {}  # kept, labelled and judged: agreed / judged per class
        self.pseudo_class_names = pseudo_class_names  # a pseudo-class run's classes (judged_label ids index them)
        self.pseudo = False  # the classes judged are pseudo-classes

    def add(self, batch: dict[str, list]) -> None:
        self.rows += len(batch["kept"])
        self.kept += sum(bool(k) for k in batch["kept"])
        self.reserved += sum(bool(r) for r in batch["reserved"])
        for reason in batch["rejected_reason"]:
            if reason is not None:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
        names = self.pseudo_class_names
        columns = (batch[c] for c in ("kept", "label", "class_name", "judged_label", "pseudo_class"))
        for k, lab, name, judged, pseudo in zip(*columns, strict=True):
            if not k or judged is None:
                continue
            if lab is not None:
                agreed = lab == judged
            elif pseudo is not None and names is not None:  # pseudo-classes, output unlabelled
                name, agreed = pseudo, 0 <= judged < len(names) and names[judged] == pseudo
            else:
                continue
            self.pseudo = self.pseudo or pseudo is not None
            entry = self.per_class.setdefault(name, {"agreed": 0, "judged": 0})
            entry["agreed"] += int(agreed)
            entry["judged"] += 1


def label_fidelity(per_class: dict[str, dict], judges: set[str], *, pseudo: bool = False) -> dict | None:
    """Kept samples the label judge assigns to their target class, overall and per class (None: the run is
    unlabelled or nothing was judged). `per_class`: class name -> {"agreed", "judged"}. `pseudo`: the
    classes are pseudo-classes (`pipeline.checks.pseudo`), said so by `"pseudo": true`."""
    if not per_class:
        return None
    for entry in per_class.values():
        entry["rate"] = entry["agreed"] / entry["judged"]
    agreed = sum(e["agreed"] for e in per_class.values())
    judged = sum(e["judged"] for e in per_class.values())
    ordered = sorted(judges)
    record = {
        "judge": ordered[0] if len(ordered) == 1 else ordered,
        "agreed": agreed,
        "judged": judged,
        "rate": agreed / judged,
        "per_class": dict(sorted(per_class.items())),
    }
    return dict(record, pseudo=True) if pseudo else record


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
            "class_names": None if bundle.pseudo_labels else bundle.class_names,  # pseudo-classes: below
            "bandwidth": bundle.bandwidth,
        },
        "pseudo_classes": bundle.pseudo_classes,
        "model": {
            "family": model.family,
            "cfg_scale": cfg_scale_for(cfg, model),
            "sampler": sampler_name(cfg.sampler, model),
            "resolution": model.image_size,
        },
        "prompts": prompts.record() if (prompts := sample_prompts(cfg, bundle, model)) is not None else None,
        "plan": {"shards": len(plan.shards), "generated": plan.num_generated, "kept": plan.num_kept},
        "pilot": pinned_pilot(cfg, bundle),
        "reach": load_reach(cfg.out),
        "label_fidelity": summary.label_fidelity,
        "summary": asdict(summary),
        "versions": {
            "mmd-augment": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }
