"""A run's life in one place: `Run` (start: checks, claim, reach check, pilot, plan; execute: the pending shards on
an executor; finish: merge, run.json, release), the job context every process builds (`build_context`), and
`run_job`, the whole job on this node.

The run's output folder is one object, `storage.run_folder.RunFolder`; where the shards run is one contract,
`pipeline.jobs.executors.Executor` (in-process, `accelerate` workers, Prefect tasks, Prefect node runs, a static
cluster). A finished run that kept fewer than `--n` samples returns its summary like any other;
`check_delivered` (`pipeline.jobs.summary`) is the verdict the CLI (exit code 3) and the flows (Failed) give it,
unless `allow_shortfall`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from storage.errors import InputError
from storage.run_folder import RunFolder

from ..checks.fidelity import make_judge
from ..checks.pilot import cache_pilot, cached_pilot, pilot_key, run_pilot
from ..checks.pseudo import assign_pseudo_classes
from ..checks.reach import reach_or_stop
from ..checks.reference import (
    attach_caption_embeddings,
    build_target,
    check_references,
    prepare_reference,
    sample_prompts,
)
from ..config import AugmentConfig
from ..models.generation import cfg_scale_for, model_label_map
from ..models.loading import LoadedModel, load_model
from ..plan import JobPlan, RemainingShards, ShardRanges, class_proportions, plan_job
from .executors import node_executor
from .summary import JobSummary, rejections, run_record, summarize
from .worker import JobContext, ShardResult

if TYPE_CHECKING:
    from storage.references import References

__all__ = ["Run", "build_context", "pending_shards", "run_job", "with_sampler"]

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}


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
    cfg: AugmentConfig,
    model: LoadedModel | None = None,
    *,
    check_reach: bool = False,
    pilot: bool = True,
    folder: RunFolder | None = None,
) -> JobContext:
    """Load the model, prepare the reference bundle (validating the references) and the MMD target.

    The references are checked before the model is loaded: an input error comes first, and alone. With
    `check_reach` (the job's start, not its workers) the reach check runs next (`pipeline.checks.reach`: an
    InputError when the model cannot draw the references), before the pilot (`--strength auto`; skipped
    without `pilot`, e.g. for a dry run's reach check).
    """
    if model is None:
        if folder is None:  # a `Run` checked the references in its preflight
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
        ctx.pilot = resolve_pilot(ctx, folder or RunFolder(cfg.out, cfg.prefix))
    return ctx


def resolve_pilot(ctx: JobContext, folder: RunFolder) -> dict:
    """`--strength auto`: the pilot's record from this run folder (a resume), else from the cache (same
    references, model and settings), else run the pilot now and cache it."""
    cfg, bundle = ctx.cfg, ctx.bundle
    key = pilot_key(cfg, bundle.content_hash, bundle.model_id, bundle.files)
    for where, record in (("the run folder", folder.load_pilot(key)), ("the cache", cached_pilot(cfg, key))):
        if record is not None:
            log.info("strength auto: %g (pilot record from %s)", record["chosen"], where)
            return record
    record = dict(run_pilot(ctx), key=key)
    cache_pilot(cfg, record)
    return record


def pending_shards(cfg: AugmentConfig, plan: JobPlan) -> RemainingShards:
    """Ids of the planned shards still to do, ascending: all but those whose done marker vouches for
    their bytes. Lazy: it holds the done ids only (listed from the markers), never all shard ids."""
    total = len(plan.shards)
    return RemainingShards(total, RunFolder(cfg.out, cfg.prefix).done_among(total))


class Run:
    """One run of a job, from its checks to its verdict; the CLI, both Prefect flows and the static cluster
    drive it and only choose an executor (`pipeline.jobs.executors`):

        run = Run(cfg).start()           # checks, claim, reach check, pilot, plan (the pending shards)
        with run.holding():              # a failure gives the folder back (its claim if no sample was written)
            run.execute(executor)        # the pending shards, wherever they run
            summary = run.finish()       # merge, run.json, release; `check_delivered(cfg, summary)`: the verdict

    A process that joins a run another one started (a worker, a node run) uses `Run.join(cfg)`.
    """

    def __init__(self, cfg: AugmentConfig, model: LoadedModel | None = None) -> None:
        self.cfg = cfg
        self.folder = RunFolder(cfg.out, cfg.prefix)
        self.model = model
        self.ctx: JobContext | None = None
        self.plan: JobPlan = plan_job(cfg)
        self.pending: RemainingShards = RemainingShards(len(self.plan.shards), [])
        self.written = 0
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    # ---- the start ------------------------------------------------------------------------------------

    def preflight(self) -> References:
        """The checks that need no model (before it loads, and all of `--dry-run`): the references (every
        file decodes; not inside `--out`), `--out` free for this configuration (a file, another run's
        folder, a changed setting, a run writing to it now). Writes nothing. Returns the references read."""
        cfg = self.cfg
        refs = check_references(cfg)
        self.folder.check_free(cfg.config_hash, cfg.hashed_fields())
        return refs

    def start(self, context: Callable[..., JobContext] | None = None) -> Run:
        """Preflight, load the model and prepare the references (the reach check, the pilot), claim the
        folder, record the inputs, clean crashed writes, list the pending shards. Bad references, settings
        and folders fail before the model loads, a model that cannot draw the references before anything is
        written. This process holds the folder's lock until `finish` (or its exit). `context`: how the job
        context is built (the flows pass one that reuses their process's model)."""
        cfg = self.cfg
        self.preflight()
        self.ctx = (context or build_context)(cfg, self.model, check_reach=True, folder=self.folder)
        self.folder.claim(cfg.config_hash, cfg.hashed_fields())
        try:
            bundle = self.ctx.bundle
            self.folder.record_inputs({"reference_content_hash": bundle.content_hash, "model_id": bundle.model_id})
            if self.ctx.reach is not None:
                self.folder.save_reach(self.ctx.reach)  # for run.json, which `finish` may write in another process
            if self.ctx.pilot is not None and self.folder.load_pilot(self.ctx.pilot["key"]) is None:
                self.folder.save_pilot(self.ctx.pilot)  # pins the choice for resumes and workers
            self.folder.clean_partial()
            lost = self.folder.forget_shards_without_part()
            if lost:
                log.warning(
                    "%d done shard(s) lost their manifest part (e.g. shard %d): regenerating", len(lost), lost[0]
                )
            self.pending = pending_shards(cfg, self.plan)
        except BaseException:
            self.folder.abandon()
            raise
        if len(self.pending) < len(self.plan.shards):
            log.info(
                "resuming: %d of %d shards already done",
                len(self.plan.shards) - len(self.pending),
                len(self.plan.shards),
            )
        self.seconds["prepare"] = round(time.perf_counter() - self._t0, 3)
        return self

    @classmethod
    def join(
        cls, cfg: AugmentConfig, ctx: JobContext | None = None, *, check_config: bool = False, load: bool = True
    ) -> Run:
        """This process works for a run another process started (an `accelerate` worker, a Prefect task or node
        run): the run's token names its temporary files; `ctx` is its job context (default: built here, unless
        `load` is False); `check_config`: the folder must be claimed, for this configuration."""
        run = cls(cfg)
        if check_config and not run.folder.claimed:
            raise RuntimeError(
                f"{cfg.out}: not claimed by a parent run; the output folder must be storage shared with the "
                "parent (mounted at the same path on every node)"
            )
        run.folder.join(*((cfg.config_hash, cfg.hashed_fields()) if check_config else ()))
        run.ctx = ctx if ctx is not None or not load else build_context(cfg, folder=run.folder)
        return run

    # ---- the shards -----------------------------------------------------------------------------------

    def execute(self, executor: Callable[[Run, ShardRanges], int]) -> int:
        """Write the pending shards with `executor` (it skips the done ones); returns how many it wrote."""
        t0 = time.perf_counter()
        with self.folder.writing():
            self.written = executor(self, self.pending)
        self.seconds[getattr(executor, "phase", "generate_filter_write")] = round(time.perf_counter() - t0, 3)
        return self.written

    def not_done(self, shards: Iterable[int]) -> ShardRanges:
        """The shards among `shards` whose done marker does not vouch for their bytes, as ranges. Costs the done
        markers listed in the folder (those among `shards` verified), never one probe per shard."""
        shards = shards if isinstance(shards, ShardRanges) else ShardRanges.from_ids(shards)
        return shards.without(sid for sid in self.folder.done_ids() if sid in shards and self.folder.is_done(sid))

    # ---- the end --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def holding(self) -> Iterator[Run]:
        """From `start` to `finish`: if it fails, undo this run's claim when it wrote no sample (a corrected
        re-run is then accepted); release the folder's lock however it ends."""
        try:
            yield self
        except BaseException:
            self.folder.abandon()
            raise
        finally:
            self.folder.release()

    def finish(self) -> JobSummary:
        """Merge the manifest parts (every shard must be done), write run.json, release the folder's lock.

        A run that kept fewer than `--n` samples (`summary.shortfall`) logs a WARNING and returns its summary
        like any other; `check_delivered` is the verdict (exit code 3 of the CLI, a Failed flow run).

        Raises:
            InputError: the run kept no sample at all (every one rejected); then it removes what it wrote.
        """
        cfg, folder, plan = self.cfg, self.folder, self.plan
        ctx = self.ctx if self.ctx is not None else build_context(cfg, folder=folder)
        folder.merge_manifest(len(plan.shards))
        pseudo_names = ctx.bundle.class_names if ctx.bundle.pseudo_labels else None
        skipped = len(plan.shards) - self.written
        summary = summarize(cfg, folder, plan, self.written, skipped, self.seconds, pseudo_class_names=pseudo_names)
        pilot = self._pinned_pilot(ctx)
        summary.strength = cfg.strength if pilot is None else pilot["chosen"]
        if summary.shortfall:
            log.warning(
                "kept %d samples, %d fewer than --n %d: some shards ran out of reserve (see the warnings above)",
                summary.num_kept,
                summary.shortfall,
                cfg.n,
            )
        if summary.num_kept == 0:  # nothing to train on: leave nothing behind, so corrected settings can run
            folder.discard_samples()
            folder.abandon()
            raise InputError(
                f"{cfg.out}: every one of the {summary.num_generated} generated samples was rejected "
                f"({rejections(summary)}): the model does not draw this domain at these settings; lower --strength "
                "(or use auto), check --model and the references, or widen --support-radius; nothing was kept, so "
                "nothing was written"
            )
        summary.seconds["total"] = round(time.perf_counter() - self._t0, 3)
        folder.write_run_record(run_record(cfg, folder, ctx.model, ctx.bundle, plan, summary, pilot))
        folder.release()
        return summary

    def _pinned_pilot(self, ctx: JobContext) -> dict | None:
        """The pilot record this run folder pinned (`--strength auto`), else None."""
        if self.cfg.strength != "auto":
            return None
        bundle = ctx.bundle
        return self.folder.load_pilot(pilot_key(self.cfg, bundle.content_hash, bundle.model_id, bundle.files))


def run_job(
    cfg: AugmentConfig,
    *,
    model: LoadedModel | None = None,
    progress: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> JobSummary:
    """Run (or resume) the whole job on this node: start, the pending shards in-process or on K `accelerate`
    workers, finish. Returns the summary also when the run kept fewer than `--n` (`summary.shortfall`); the
    CLI and the flows then call `check_delivered`."""
    run = Run(cfg, model).start()
    with run.holding():
        if progress is not None:
            progress(sum(run.plan.shards[sid].num_kept for sid in run.pending.excluded))
        run.execute(node_executor(cfg, progress, on_shard))
        return run.finish()
