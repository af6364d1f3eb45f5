"""What a finished run delivered: its summary (counts from the manifest, MMD² from the done markers, label
fidelity), the verdict on a run that kept fewer than `--n` (`check_delivered`), and the `run.json` record."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field

import torch

from storage.run_folder import RunFolder

from .. import __version__
from ..checks.reference import ReferenceBundle, sample_prompts
from ..config import AugmentConfig
from ..models.generation import cfg_scale_for, sampler_name
from ..models.loading import LoadedModel
from ..plan import JobPlan


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


def check_delivered(cfg: AugmentConfig, summary: JobSummary) -> None:
    """Raise `FinishedShort` if the finished run kept fewer than `--n` samples, unless `allow_shortfall`
    accepts that (its WARNING is logged by `Run.finish` either way). A re-run of a finished job
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


def summarize(
    cfg: AugmentConfig,
    folder: RunFolder,
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
    for batch in folder.manifest_batches(counts.COLUMNS):
        counts.add(batch)
    pool, kept = _Mean(), _Mean()
    shortfall, judges = 0, set()
    for sid in range(len(plan.shards)):
        marker = folder.read_marker(sid) or {}
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


def run_record(
    cfg: AugmentConfig,
    folder: RunFolder,
    model: LoadedModel,
    bundle: ReferenceBundle,
    plan: JobPlan,
    summary: JobSummary,
    pilot: dict | None,
) -> dict:
    """What `run.json` holds: the config and its hash, the model, the references, the plan, the pilot's and the
    reach check's records, the summary and the versions."""
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
        "pilot": pilot,
        "reach": folder.load_reach(),
        "label_fidelity": summary.label_fidelity,
        "summary": asdict(summary),
        "versions": {
            "mmd-augment": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }
