"""The reach check: before the job, can the model draw the references at all?

A model that cannot draw the references' domain (the shipped 32×32 digit prior given chest X-rays) makes
a job that generates digits and rejects or keeps them, at full cost, and says so only at the end. Before
the job, `check_reach`:

1. draws one small *unguided* batch (`reach_samples`, at min(`steps`, `reach_steps`) steps, with the
   job's sampler, η, classes, CFG and Internal-Guidance settings), seeded from the run seed (deterministic);
2. compares it with the references in two spaces: the latent space the filter works in, and the pilot's
   feature space (`pilot.feature_space`: the shipped digit classifier's features when it can read the
   references, else the decoded images downsampled; references decoded, as the pilot does). In each:
   - **support**: the share of samples inside the references' support, by the filter's rule
     (`reference.outside_support`: the nearest reference within `support_radius` × the median reference
     distance of that space); in the latent space, the share the filter would accept;
   - **coverage**: the share of references with a sample near them: inside their k-nearest-neighbour
     ball (`measures.metrics.prdc`, k = 3; at most MAX_COMPARED references, a seeded subset).
3. decides (`verdict`):
   - `nil` when, in either space, *both* shares are at most `reach_refuse_share` (default 0.05: at most
     1 of 32 samples and 1 in 20 references): the model draws nothing like the references. The job stops
     with exit 2 and one line that says what the model draws, what the references are, and what to do
     (`--model`, or `--force` to go on). Also `nil` when *no* space has a sample near any reference
     (every coverage at most `reach_refuse_share`) and most samples fall outside the support in every
     space (every support share below `reach_warn_share`): a prior whose classifier reads anything (the
     shipped v3 classifier trained on broadly augmented digits gives X-ray-like images 0.87 confidence)
     puts a few samples inside a loose support, yet none near a reference; and also `nil` when no space has a
     sample near any reference and in every space the median sample is farther from its nearest reference than
     `FAR_MEDIAN` (1.5) median reference distances (the support radius of 3 is loose: dark-on-white digits fall
     "inside" it though the prior draws only white-on-black ones);
   - `weak` when a support share is below `reach_warn_share` (default 0.5: the filter would reject half
     the samples, or they decode to images outside the references' support): a WARNING with the numbers;
   - `ok` otherwise. Coverage alone never warns: 32 samples cannot come near every one of hundreds of
     references, and the digit classifier's tight class clusters give near-zero coverage even to good
     unconditional digits.

Both measures must fail (in one space, or across both) before the job is refused, so a model of the right
domain is not turned away by one noisy measure: refusing is for the case where the job could only produce
garbage.
Its record goes to `<out>/reach.json` and `run.json` (`reach`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from guidance import nearest_reference_distance
from guidance.kernels import median_pairwise_distance
from storage.errors import InputError

from ..config import AugmentConfig
from ..measures.features import extract
from ..measures.metrics import prdc
from ..models.generation import generate, sampler_name
from ..plan import ShardPlan, assign_classes
from ..seeding import derive_seed
from .pilot import PRDC_K, feature_space
from .reference import outside_support

log = logging.getLogger(__name__)

REACH_VERSION = 2  # 2: the distance rule (samples farther from every reference than the references are apart)

#: The distance rule of `verdict`: the median sample's nearest reference farther than this many median
#: reference distances, in every space, with no reference covered. Measured (benchmarks/yardstick.py, 32
#: unguided samples of the shipped prior): dark-on-white digits 1.93 (latent) and 2.39 (pixels); every domain
#: it draws, near or far (thicker, noisy, printed, seven-segment, textured digits), at most 1.29.
FAR_MEDIAN = 1.5

#: Quantiles of the samples' nearest-reference distances the record keeps (in median reference distances).
QUANTILES = (0.1, 0.5, 0.9)

#: References compared in the coverage measure and decoded for the feature space (a seeded subset beyond).
MAX_COMPARED = 512

#: What to give `--model` when the shipped prior cannot draw the references.
MODEL_ADVICE = (
    "give --model a diffusers model of their domain (a local folder or a hub id; for chest X-rays, a Stable "
    "Diffusion-family checkpoint trained on radiographs), or --force to go on"
)


@dataclass
class SpaceReach:
    """How the reach batch meets the references in one space."""

    space: str
    support: float | None  # share of samples inside the references' support (None: all references coincide)
    coverage: float  # share of (compared) references with a sample inside their k-NN ball
    median_distance: float  # the median reference distance the support radius is measured in
    nearest: list[float | None]  # 10%, 50%, 90% quantiles of a sample's nearest-reference distance / median_distance

    def is_nil(self, share: float) -> bool:
        return self.support is not None and self.support <= share and self.coverage <= share

    @property
    def far(self) -> bool:
        """The median sample sits farther from its nearest reference than FAR_MEDIAN median reference distances."""
        median = self.nearest[QUANTILES.index(0.5)] if 0.5 in QUANTILES else None
        return median is not None and median > FAR_MEDIAN


def measure(
    samples: torch.Tensor,
    references: torch.Tensor,
    radius: float,
    *,
    space: str,
    median_distance: float | None = None,
    compared: torch.Tensor | None = None,
) -> SpaceReach:
    """Support and coverage of `samples` [n, ...] against `references` [m, ...] (flattened).

    Support uses every reference and `median_distance` (default: the median pairwise reference distance);
    coverage only the rows `compared` (default: all), with k = min(3, n − 1, m − 1).
    """
    x = samples.reshape(len(samples), -1).double()
    y = references.reshape(len(references), -1).double()
    if median_distance is not None:
        med = float(median_distance)
    else:
        try:
            med = float(median_pairwise_distance(y))
        except ValueError:  # (nearly) all references the same point: no scale to measure the support in
            med = 0.0
    nearest = nearest_reference_distance(x, y)
    support, ratios = None, [None] * len(QUANTILES)
    if med > 0:
        support = float((~outside_support(nearest, med, radius)).double().mean())
        ratios = torch.quantile(nearest / med, torch.tensor(QUANTILES, dtype=nearest.dtype)).tolist()
    y_cov = y if compared is None else y[compared]
    k = max(1, min(PRDC_K, len(x) - 1, len(y_cov) - 1))
    quantiles = [None if r is None else round(r, 4) for r in ratios]
    return SpaceReach(space, support, prdc(x, y_cov, k=k)["coverage"], med, quantiles)


def verdict(spaces: list[SpaceReach], refuse_share: float, warn_share: float) -> str:
    """ "nil" if in some space both shares are at most `refuse_share`, or if no space covers the references
    (every coverage at most `refuse_share`) while every support share is below `warn_share` or every space finds
    the samples far from all references (`SpaceReach.far`: the support radius is loose in many dimensions, so a
    sample of another kind still counts as inside); "weak" if a support share is below `warn_share`; else "ok"
    (see the module doc)."""
    if any(s.is_nil(refuse_share) for s in spaces):
        return "nil"
    measured = [s for s in spaces if s.support is not None]
    uncovered = measured and all(s.coverage <= refuse_share for s in measured)
    if uncovered and (all(s.support < warn_share for s in measured) or all(s.far for s in measured)):
        return "nil"
    if any(s.support is not None and s.support < warn_share for s in spaces):
        return "weak"
    return "ok"


def compared_references(count: int, seed: int, limit: int = MAX_COMPARED) -> torch.Tensor:
    """Indices of the references the coverage measure compares: all, or a seeded subset of `limit`."""
    if count <= limit:
        return torch.arange(count)
    gen = torch.Generator().manual_seed(derive_seed("reach-references", seed))
    return torch.randperm(count, generator=gen)[:limit].sort().values


def check_reach(ctx: Any) -> dict[str, Any]:
    """The reach check's record (JSON-ready) for a job's context (`pipeline.jobs.worker.JobContext`): samples,
    steps, what the model draws and the references are, each space's shares, thresholds, verdict, seconds.
    Raises nothing itself."""
    cfg, model, bundle = ctx.cfg, ctx.model, ctx.bundle
    count = len(bundle.files) + len(bundle.heldout_files)
    record: dict[str, Any] = {
        "version": REACH_VERSION,
        "model": model.draws,
        "model_id": model.model_id,
        "references": {"count": count, "source": bundle.source},
    }
    if not cfg.reach_check:
        return dict(record, verdict="off", reason="reach_check is off (--no-reach-check)")
    t0 = time.perf_counter()
    seed = derive_seed("reach", cfg.seed) & 0x7FFFFFFF
    n, steps = cfg.reach_samples, min(cfg.steps, cfg.reach_steps)
    # unguided, so batch coupling gives the same samples as sequential, faster
    reach_cfg = cfg.model_copy(update={"seed": seed, "strength": 0.0, "steps": steps, "coupling": "batch"})
    labels = assign_classes(reach_cfg, ShardPlan(0, 0, n, n), ctx.proportions)
    latents = generate(
        reach_cfg, model, ctx.target, float(reach_cfg.strength), ctx.model_labels, range(n), labels, prompts=ctx.prompts
    )
    compared = compared_references(len(bundle.latents), seed)
    latent = measure(
        latents,
        bundle.latents,
        cfg.support_radius,
        space="latent",
        median_distance=bundle.bandwidth,  # the filter's own scale
        compared=compared,
    )
    ref_images = model.decode(bundle.latents[compared].to(model.device), batch_size=cfg.batch_size)
    digits = None
    if ctx.model_labels is not None and bundle.labels is not None:
        digits = torch.tensor([ctx.model_labels[int(c)] for c in bundle.labels[compared]])
    features = feature_space(cfg.model, model.image_channels, model.image_size, ref_images, digits)
    sample_images = model.decode(latents.to(model.device), batch_size=cfg.batch_size)
    featured = measure(
        extract(features, sample_images), extract(features, ref_images), cfg.support_radius, space=features.name
    )
    record["references"]["compared"] = len(compared)
    record["feature_space"] = features.description
    return dict(
        record,
        verdict=verdict([latent, featured], cfg.reach_refuse_share, cfg.reach_warn_share),
        forced=cfg.force,
        samples=n,
        steps=steps,
        sampler=sampler_name(cfg.sampler, model),
        seed=seed,
        latent=asdict(latent),
        features=asdict(featured),
        thresholds={
            "refuse_share": cfg.reach_refuse_share,
            "warn_share": cfg.reach_warn_share,
            "support_radius": cfg.support_radius,
        },
        seconds=round(time.perf_counter() - t0, 3),
    )


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def shares_text(record: dict[str, Any]) -> str:
    """ "of 32 unguided samples, 0% fall inside the references' support in the latent space and 3% in the
    feature space (pixels); 4% of the references have a sample near them there and 0% in the latent space" """
    lat, feat = record["latent"], record["features"]
    text = (
        f"of {record['samples']} unguided samples, {_pct(lat['support'])} fall inside the references' support in "
        f"the latent space and {_pct(feat['support'])} in the feature space ({feat['space']}); "
        f"{_pct(feat['coverage'])} of the references have a sample near them there and {_pct(lat['coverage'])} in "
        "the latent space"
    )
    medians = [s.get("nearest", [None] * len(QUANTILES))[QUANTILES.index(0.5)] for s in (lat, feat)]
    if all(m is not None and m > FAR_MEDIAN for m in medians):
        text += (
            f"; the median sample lies {medians[0]:.2g} and {medians[1]:.2g} median reference distances from its "
            "nearest reference"
        )
    return text


def _cannot_draw(record: dict[str, Any]) -> str:
    refs = record["references"]
    return (
        f"the model cannot draw these references (reach check): the model ({record['model_id']}) draws "
        f"{record['model']}, the references are {refs['count']} images, {refs['source']}; {shares_text(record)}"
    )


def unreachable_message(cfg: AugmentConfig, record: dict[str, Any]) -> str:
    """The one line a refused job ends with."""
    return f"--ref {cfg.ref}: {_cannot_draw(record)}; {MODEL_ADVICE}"


def enforce_reach(cfg: AugmentConfig, record: dict[str, Any]) -> None:
    """Stop (InputError, one line) on a `nil` verdict unless `force`; warn on `weak` (and on a forced
    `nil`); say the result at INFO otherwise."""
    kind = record["verdict"]
    if kind == "off":
        log.info("reach check: off")
        return
    if kind == "nil" and not cfg.force:
        raise InputError(unreachable_message(cfg, record))
    if kind == "nil":
        log.warning("%s; going on (--force)", _cannot_draw(record))
    elif kind == "weak":
        refs = record["references"]
        log.warning(
            "reach check: the model reaches these references only weakly: %s; expect the filter to reject many "
            "samples (extra cost, perhaps fewer than --n kept) or samples unlike the references; check that "
            "--model suits them (it draws %s, they are %d images, %s)",
            shares_text(record),
            record["model"],
            refs["count"],
            refs["source"],
        )
    else:
        log.info("reach check: ok (%s; %.1f s)", shares_text(record), record["seconds"])


def reach_or_stop(ctx: Any) -> dict[str, Any]:
    """Run the reach check for `ctx` and act on it (`enforce_reach`); returns the record."""
    record = check_reach(ctx)
    enforce_reach(ctx.cfg, record)
    return record


__all__ = [
    "MAX_COMPARED",
    "SpaceReach",
    "check_reach",
    "compared_references",
    "enforce_reach",
    "measure",
    "reach_or_stop",
    "shares_text",
    "unreachable_message",
    "verdict",
]
