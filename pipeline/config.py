"""The one validated, frozen, serialisable config object that flows from the CLI/flow down to workers."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SamplerName = Literal["auto", "ddim", "ddpm", "euler", "dpmpp"]
GuidanceName = Literal["none", "latent", "posterior", "lookahead", "noisy"]
KernelName = Literal["rbf", "rbf-multi", "imq", "cubic", "rff"]
ScheduleName = Literal["constant", "interval", "linear_decay", "linear_ramp"]
NormalizationName = Literal["per_sample", "batch", "raw"]
DTypeName = Literal["auto", "float32", "float16", "bfloat16"]

#: The largest guidance strength accepted. With `per_sample` normalisation a strength of 1 already moves x̂0
#: by its whole length at every step; far larger values (1e30) only overflow to NaN.
MAX_STRENGTH = 100.0

#: `pilot_samples auto`: the fewest and most samples per candidate strength.
PILOT_MIN_SAMPLES = 64
PILOT_MAX_SAMPLES = 512

#: Fields that do not change which samples are produced (excluded from the config hash). `ref` is a path:
#: the references' *content* is what matters, and a run folder records and compares it (`.inputs.json`),
#: so `refs`, `refs/`, its absolute path or a moved copy all resume the same run.
#: `allow_shortfall` only decides what a finished run reports (exit code 3 or 0), so a re-run of a run that
#: finished short may add it.
RUNTIME_FIELDS = frozenset(
    {"out", "ref", "device", "processes", "progress", "cache_dir", "allow_shortfall", "offload"}
    # the reach check only decides whether the job starts: `--force` or other thresholds resume the same run
    | {"reach_check", "reach_samples", "reach_steps", "reach_refuse_share", "reach_warn_share", "force"}
)

#: Fields added after runs were first made, with the value they are hashed as *absent* at: a run that leaves them at
#: these values keeps the config hash it had before they existed (its shards stay byte-identical and it resumes).
ADDED_FIELD_DEFAULTS: dict[str, object] = {
    "prompt": None,
    "negative_prompt": None,
    "class_prompt": None,
    "resolution": None,
}

#: `auto` settings hashed as the value they stood for before `auto` existed, where they resolve to it: on the
#: shipped prior (`model` None or "shipped") `cfg_scale auto` is 2 and `sampler auto` is DDIM, as before.
SHIPPED_AUTO_AS = {"cfg_scale": 2.0, "sampler": "ddim"}

#: Fields set only in a config file (`--config FILE`), on purpose: every other field is a flag of
#: `augment` and `augment flow` (generated from this class by `pipeline.cli.options`). Empty today.
CONFIG_FILE_ONLY: frozenset[str] = frozenset()


class AugmentConfig(BaseModel):
    """Everything that defines an `augment` run. Its hash goes into every sample's metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # no inf/nan in any setting

    # what and where
    ref: str = Field(description="reference folder or fsspec URL (class sub-folders = labels)")
    out: str = Field(description="output folder (shards/, manifest.parquet, run.json)")
    n: int = Field(ge=1, description="number of samples to keep")
    model: str | None = Field(
        default=None,
        description="diffusers folder or hub id, or 'pkg.mod:factory'; default: the shipped prior (a local "
        "folder is recorded by its absolute path: ./m and /abs/m are the same setting)",
    )
    prefix: str = Field(default="synthetic", pattern=r"^[A-Za-z0-9_-]+$", description="shard file prefix")
    seed: int = Field(default=0, ge=0, description="run seed (sample i's noise comes from (seed, i))")
    holdout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of the references held out of guidance (for `augment eval`)",
    )
    cache_dir: str | None = Field(
        default=None, description="where reference bundles are cached; default ~/.cache/mmd-augment/references"
    )

    # sampling
    sampler: SamplerName = Field(
        default="auto",
        description="diffusers sampler; auto: DDIM for DDPM-style (VP) models, the model's own scheduler for "
        "flow-matching models (SD3, Flux, Sana), which accept auto or euler",
    )
    steps: int = Field(default=50, ge=1, le=1000, description="sampling steps")
    eta: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="DDIM η: 1 = ancestral (much better samples from the shipped prior), 0 = deterministic ODE",
    )
    batch_size: int = Field(default=64, ge=1, description="samples per batch (lower it on out-of-memory)")
    resolution: int | None = Field(
        default=None,
        ge=8,
        description="side of the generated (square) images in pixels, for text-to-image models; default: the "
        "model's own (SD 1.5: 512, SDXL and Flux: 1024, ...); the references are resized to it",
    )
    cfg_scale: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        default="auto",
        description="classifier-free guidance scale (1 = off), at twice the denoiser calls; acts on class-conditional "
        "samples and on prompted samples of text-to-image models; guidance-distilled Flux gets it as its guidance "
        "input instead. auto: 2 for class-label models (as measured on the shipped prior), the family's customary "
        "scale for text models (docs/models.md)",
    )
    prompt: str | None = Field(
        default=None,
        description="text-to-image models: the prompt of every sample (captions of the references, when they have "
        "some, are used instead only without it)",
    )
    negative_prompt: str | None = Field(
        default=None, description="text-to-image models: the unconditional branch of classifier-free guidance"
    )
    class_prompt: str | None = Field(
        default=None,
        description="text-to-image models with class sub-folders: the prompt of each class, with the folder name in "
        '{} ("a chest x-ray showing {}")',
    )
    ig_scale: float = Field(default=1.0, ge=0.0, description="Internal Guidance scale (1 = off)")
    ig_interval: tuple[float, float] | None = Field(
        default=None,
        description="START,END: apply Internal Guidance only in this fraction of the trajectory (default: all)",
    )

    # MMD guidance
    guidance: GuidanceName = Field(
        default="noisy", description="where the MMD gradient acts (docs/how-a-run-works.md, Method)"
    )
    lookahead_steps: int | None = Field(default=2, ge=1, description="sub-steps k of the lookahead mode")
    kernel: KernelName = Field(default="rbf", description="MMD kernel (bandwidth: median reference distance)")
    bandwidth_factors: tuple[float, ...] = Field(
        default=(0.5, 1.0, 2.0), description="rbf-multi: bandwidths as multiples of the median distance"
    )
    rff_features: int = Field(default=2048, ge=16, description="rff: number of random Fourier features")
    strength: float | Literal["auto"] = Field(
        default="auto",
        description="guidance strength s, or 'auto': a pilot on a held-out split of the references chooses it "
        "per job (see the pilot_* settings)",
    )
    schedule: ScheduleName = Field(default="constant", description="strength schedule over the trajectory")
    schedule_start: float = Field(
        default=0.0, ge=0.0, le=1.0, description="guide from this fraction of the trajectory ..."
    )
    schedule_end: float = Field(default=1.0, ge=0.0, le=1.0, description="... up to this fraction")
    normalization: NormalizationName = Field(
        default="per_sample", description="step rule: per_sample = s x |x| along -grad; batch; raw = s x grad"
    )
    attraction_floor: float | None = Field(
        default=None,
        gt=0.0,
        description="latent/noisy: shrink the step of a sample whose attraction to the references is below this "
        "fraction of its batch repulsion (runaway samples stop being pushed out); None = off",
    )
    memory: int = Field(default=0, ge=0, description="finished samples remembered per shard (0 = off)")
    class_aware: bool = Field(
        default=True, description="labelled references: each sample only meets references of its class"
    )
    coupling: Literal["batch", "sequential"] = Field(
        default="batch",
        description="batch: each batch guided jointly; sequential: the public code's scheme, one sample at a time "
        "against a memory bank of finished samples reset every `memory` samples",
    )
    class_balance: Literal["reference", "uniform"] = Field(
        default="reference", description="class proportions of the samples: as in the references, or uniform"
    )
    pseudo_classes: bool = Field(
        default=True,
        description="unlabelled references on a class-conditional model: give each reference the class a judge "
        "reads in it and sample class-conditionally in the references' class proportions; off, or no judge reads "
        "them: the null class",
    )
    pseudo_labels: bool = Field(
        default=False,
        description="with pseudo-classes: write each sample's pseudo-class in its json and the manifest, marked as "
        "a pseudo-label (without it the output stays unlabelled; the manifest's pseudo_class column keeps it)",
    )

    # strength pilot (--strength auto)
    pilot_samples: Annotated[int, Field(ge=8)] | Literal["auto"] = Field(
        default="auto",
        description="samples the strength pilot generates per candidate strength; auto: pilot_budget of the job's "
        f"samples shared by the ladder's candidates, {PILOT_MIN_SAMPLES} to {PILOT_MAX_SAMPLES} each",
    )
    pilot_budget: float = Field(
        default=0.05,
        gt=0.0,
        le=1.0,
        description="pilot_samples auto: the fraction of the job's generated samples the pilot may spend",
    )
    pilot_holdout: float = Field(
        default=0.3,
        gt=0.0,
        lt=1.0,
        description="fraction of the references the pilot holds out of guidance to score candidates against",
    )
    pilot_start: float = Field(default=0.01, gt=0.0, description="the weakest candidate strength of the pilot")
    pilot_max_strength: float = Field(
        default=1.28,
        gt=0.0,
        le=MAX_STRENGTH,
        description="the strongest candidate strength of the pilot (its ladder: pilot_start x pilot_factor^k up to "
        "this)",
    )
    pilot_factor: float = Field(
        default=2.0, gt=1.0, le=16.0, description="ratio of consecutive candidate strengths of the pilot's ladder"
    )
    pilot_rule: Literal["middle", "strongest", "weakest", "lowest"] = Field(
        default="middle",
        description="which feasible candidate the pilot chooses among those whose held-out MMD² is within one "
        "(paired bootstrap) standard error of the lowest: the middle one (on the geometric ladder), the strongest "
        "or the weakest; or the lowest itself",
    )
    pilot_bootstrap: int = Field(
        default=200, ge=20, le=10000, description="bootstrap draws of the pilot's standard errors"
    )

    # filter and output
    keep: float = Field(default=0.9, gt=0.0, le=1.0, description="fraction of generated samples the filter keeps")
    support_radius: float = Field(
        default=3.0,
        gt=0.0,
        description="a sample farther than this many median reference distances from every reference (latent "
        "space) is outside the references' support: rejected, never kept",
    )
    reserve: float = Field(
        default=1.0,
        ge=0.0,
        description="extra samples a shard may generate from its reserved indices to replace rejected ones, as a "
        "fraction of its planned pool (the cap; a shard that still falls short keeps fewer and warns)",
    )
    label_filter: bool | Literal["auto"] = Field(
        default="auto",
        description="labelled runs: also reject samples the label judge assigns to another class than their target; "
        "auto: on where the judge is the shipped digit classifier (the shipped prior with digit classes or "
        "pseudo-classes), off where it is a k-NN vote among the references",
    )
    shard_size: int = Field(default=1000, ge=1, description="kept samples per shard")
    save_latents: bool = Field(default=False, description="store latent.npy in each sample")
    keep_rejected: bool = Field(default=False, description="also write the rejected samples (audit shards)")

    # reach check (before the job: can the model draw the references at all?)
    reach_check: bool = Field(
        default=True,
        description="before the job, draw a small unguided batch and compare it with the references; stop "
        "(exit 2) when the model cannot draw them (docs/how-a-run-works.md)",
    )
    reach_samples: int = Field(default=32, ge=8, le=1024, description="unguided samples the reach check draws")
    reach_steps: int = Field(
        default=10, ge=1, le=1000, description="sampling steps of the reach check (at most --steps)"
    )
    reach_refuse_share: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="the reach check stops the job when, in the latent or in the feature space, at most this share "
        "of its samples fall inside the references' support and at most this share of the references have a "
        "sample near them, or when in both spaces at most this share of the references have a sample near them "
        "and fewer than --reach-warn-share of the samples fall inside the support",
    )
    reach_warn_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="the reach check warns when fewer than this share of its samples fall inside the references' "
        "support (latent or feature space)",
    )
    force: bool = Field(
        default=False, description="go on when the reach check finds that the model cannot draw the references"
    )

    # runtime only (not hashed)
    offload: bool = Field(
        default=False,
        description="move each model component to the GPU only while it runs (diffusers' model CPU offload), for "
        "cards that cannot hold the whole model",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:1 ...")
    dtype: DTypeName = Field(default="auto", description="model dtype (auto: float32 on CPU, bf16/fp16 on GPU)")
    processes: int = Field(default=1, ge=1, description="worker processes on this node (accelerate)")
    progress: Literal["bar", "quiet", "json"] = Field(
        default="bar", description="progress bar, quiet, or JSON lines on stderr"
    )
    allow_shortfall: bool = Field(
        default=False,
        description="accept a run that keeps fewer than --n samples (shards whose reserve ran out): exit 0 with "
        "a warning instead of exit code 3 (finished short)",
    )

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        if self.schedule_start > self.schedule_end:
            raise ValueError(f"schedule_start ({self.schedule_start}) must be <= schedule_end ({self.schedule_end})")
        if self.ig_interval is not None and not 0.0 <= self.ig_interval[0] <= self.ig_interval[1] <= 1.0:
            raise ValueError(f"ig_interval must satisfy 0 <= start <= end <= 1, got {self.ig_interval}")
        if isinstance(self.strength, float) and not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"strength must be a finite number >= 0 or 'auto', got {self.strength}")
        if self.pilot_start > self.pilot_max_strength:
            raise ValueError(
                f"pilot_start ({self.pilot_start}) must be <= pilot_max_strength ({self.pilot_max_strength})"
            )
        if any(f <= 0 for f in self.bandwidth_factors):
            raise ValueError(f"bandwidth_factors must be positive, got {self.bandwidth_factors}")
        if self.class_prompt is not None and "{}" not in self.class_prompt:
            raise ValueError(
                f"class_prompt must contain {{}} (where the class folder name goes), got {self.class_prompt!r}"
            )
        if self.reach_refuse_share > self.reach_warn_share:
            raise ValueError(
                f"reach_refuse_share ({self.reach_refuse_share}) must be <= reach_warn_share ({self.reach_warn_share})"
            )
        return self

    @field_validator("model")
    @classmethod
    def _local_model_by_absolute_path(cls, value: str | None) -> str | None:
        """A local model folder by its absolute path, so `./m`, `m/` and `/abs/m` are one setting (one
        config hash: a resume with either is accepted) and every process of a job reads the same folder
        whatever its working directory. A hub id, an import path, a URL and the shipped prior (None,
        'shipped') stay as given. Symbolic links are kept (the model's content is checked separately:
        `.inputs.json` records its id)."""
        if value is None or value == "shipped" or "://" in value:
            return value
        path = os.path.expanduser(value)
        return os.path.abspath(path) if os.path.exists(path) else value

    @field_validator("strength", mode="before")
    @classmethod
    def _finite_bounded_strength(cls, value: object) -> object:
        """One clear error for inf/nan and absurd strengths (instead of one per branch of the union)."""
        if value == "auto" or isinstance(value, bool):
            return value
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return value  # not a number: pydantic says so
        if not math.isfinite(number):
            raise ValueError(f"{value} is not a finite number; give a number >= 0 or 'auto'")
        if number > MAX_STRENGTH:
            raise ValueError(
                f"{number:g} is far beyond any useful step (at most {MAX_STRENGTH:g}; the default 'auto' lets a "
                "pilot choose, docs/results.md §3.1 sweeps 0.001-0.1)"
            )
        return value

    # --- derived quantities -------------------------------------------------------------------
    @property
    def samples_per_shard(self) -> int:
        """Generated samples per shard: over-generate so that `shard_size` are kept after filtering."""
        return math.ceil(self.shard_size / self.keep)

    def hashed_fields(self) -> dict:
        """The sample-defining settings: all but the runtime ones, added fields left at their defaults dropped,
        and the shipped prior's `auto` settings as the values they stood for (`ADDED_FIELD_DEFAULTS`,
        `SHIPPED_AUTO_AS`: runs made before those fields existed keep their hash)."""
        fields = {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
        for name, default in ADDED_FIELD_DEFAULTS.items():
            if fields.get(name) == default:
                del fields[name]
        if self.model in (None, "shipped"):
            fields.update({k: v for k, v in SHIPPED_AUTO_AS.items() if fields[k] == "auto"})
        return fields

    @property
    def config_hash(self) -> str:
        """sha256 of the sample-defining fields (16 hex chars)."""
        payload = json.dumps(self.hashed_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: object) -> AugmentConfig:
        """Load a JSON (or TOML) config file; keyword overrides win (None included: pass only what was given).

        Raises:
            OSError: the file cannot be read. ValueError: it is not a JSON/TOML object of settings.
            pydantic.ValidationError: a setting is invalid.
        """
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"must hold an object of settings (names to values), not {json.dumps(data)[:40]}")
        data.update(overrides)
        return cls.model_validate(data)
