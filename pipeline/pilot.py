"""`--strength auto`: choose the guidance strength per job with a pilot on a held-out split of the references.

The right strength depends on how far the target is from the prior, so a fixed default does not transfer
between domains. Before the job, the pilot:

1. splits the references (stratified, seeded) into a *guide* part (what the pilot steers towards) and a
   *held-out* part (`pilot_holdout`, what it scores against);
2. generates one small batch (`pilot_samples`, the job's sampler, steps, classes and batch coupling) per
   candidate strength, every candidate from the same seeds (common random numbers: differences between
   candidates come from the strength, not from the noise), plus the unguided baseline (s = 0);
3. scores each candidate by alignment to the held-out part in a feature space *other than the guided
   latent space* (the shipped digit classifier's penultimate features for the shipped prior when the
   classifier can read the references, else the decoded images downsampled to at most 32×32 pixels; see
   `feature_space`): unbiased RBF MMD² (median bandwidth of the held-out features), lower is better;
4. under constraints that keep alignment from being bought with fidelity or diversity (MMD² alone calls a
   collapse onto one blob shape "better"):
   - precision no lower than unguided (within one binomial standard error of the pilot batch; k = 3),
   - coverage at least 0.9 × unguided, and the median distance from a sample to its nearest other sample
     at least half of unguided's (no collapse onto a few shapes: near-duplicates drive it to 0),
   - labelled runs: the judged class histogram no further from the plan than unguided + 0.1 in total
     variation, plus one standard error of that distance on the pilot batch (1/(2√n), 0.0625 at n = 64:
     the smallest step must not be refused for sampling noise; `class_tv_standard_error`),
   - garbage at most unguided + 2 points (or + its binomial standard error, if larger): samples outside
     the guide references' support (the filter's rule, latent space) or, in the scoring space, farther
     from every reference than any reference is from its nearest other one (`evaluation.metrics.garbage`).
     Where that scoring-space rule flags more than half of the *unguided* samples it means nothing there
     (decoded pixels of a domain the prior cannot draw): it is dropped, said so in the record and the log,
     and garbage is judged by the latent-support rule alone;
5. searches (`search`): doubles from `pilot_start` while candidates stay feasible and improve. When the
   first candidate is infeasible, or the best of the doubling, it halves instead (down to
   `pilot_min_strength`) while candidates are infeasible or improve. When the doubling is stopped by
   `pilot_max_strength` rather than by the data (the best is the largest allowed), the record and the log
   say so and the doubling goes on up to `pilot_hard_max_strength`. It then refines around the best (×√2
   on either side not yet tried, within the bounds), as training-free guidance searches do, and keeps
   the feasible candidate with the lowest MMD² if it beats unguided (else 0: guidance off, said so in the
   record). If the choice sits at a bound the search reached without the data stopping it (the hard cap,
   or the floor), the reason says the bound, not the data, chose.

Its record (candidates, scores, constraints, choice, cost) goes to `run.json` and the eval report; it is
cached per references, model and settings (`storage.pilot`); what the search did beyond doubling and
refining (halving, extending the range, a dropped constraint, a bound that chose) is in its `notes`. The
search and the choice are pure functions (`search`, `choose`, `is_feasible`) tested on constructed cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from guidance import RBFKernel, mmd2, nearest_reference_distance
from guidance.kernels import median_pairwise_distance

from .config import AugmentConfig
from .evaluation.features import (
    FeatureExtractor,
    classifier_extractor,
    extract,
    fit_images,
    load_shipped_classifier,
    shipped_classifier_available,
)
from .evaluation.metrics import garbage, nearest_neighbour_distances, prdc
from .plan import ShardPlan, assign_classes, primary_count
from .seeding import derive_seed

log = logging.getLogger(__name__)

PILOT_VERSION = 2  # 2: halving, range extension, class-TV noise tolerance, meaningless garbage dropped

#: Config fields the pilot's outcome does not depend on (besides the runtime-only ones).
IRRELEVANT_FIELDS = frozenset(
    {"n", "shard_size", "prefix", "keep", "save_latents", "keep_rejected", "reserve", "label_filter", "strength"}
)

#: Constraint margins (see the module doc).
COVERAGE_FRACTION = 0.9
SPREAD_FRACTION = 0.5
PRDC_K = 3
CLASS_TV_MARGIN = 0.1
GARBAGE_MARGIN = 0.02
#: A scoring-space garbage rule that flags more than this fraction of the unguided samples is meaningless there.
MEANINGLESS_GARBAGE = 0.5

#: The pilot needs at least this many references in each part; fewer and the job uses FALLBACK_STRENGTH.
MIN_PILOT_REFERENCES = 8
FALLBACK_STRENGTH = 0.01  # the sweep's best on the two example domains (docs/results.md §3.1)

#: Largest side of the downsampled-pixel feature space (models without the shipped classifier).
PIXEL_FEATURE_SIZE = 32
#: The shipped classifier's features score the pilot only if it reads the held-out references this well.
READABLE = 0.8


@dataclass
class Candidate:
    """One strength's scores on the pilot batch."""

    strength: float
    mmd2: float
    precision: float
    recall: float
    coverage: float
    garbage: float  # fraction outside the guide references' support or far from every reference (features)
    spread: float  # median distance from a sample to its nearest other sample (features)
    class_tv: float | None  # total variation between the judged class histogram and the plan (labelled)
    seconds: float
    feasible: bool = True
    violations: list[str] = field(default_factory=list)
    outside: float | None = None  # the part of `garbage` outside the guide references' support (latent space)
    far: float | None = None  # the part of `garbage` far from every reference in the scoring space


def class_tv_standard_error(n: int) -> float:
    """A bound on the standard error of the total variation between an `n`-sample class histogram and a
    fixed plan, whatever the classes' shares: 1/(2√n)."""
    # TV^ − TV ≈ ½ Σ_k s_k (p^_k − p_k), s_k = sign(p_k − q_k): variance (1 − (Σ_k s_k p_k)²)/(4n) ≤ 1/(4n)
    return 0.5 / math.sqrt(max(n, 1))


def scoring_garbage_meaningless(base: Candidate) -> bool:
    """Whether the scoring-space garbage rule flags most unguided samples (then it constrains nothing)."""
    return base.far is not None and base.far > MEANINGLESS_GARBAGE


def is_feasible(c: Candidate, base: Candidate, n: int) -> list[str]:
    """The constraints `c` violates against the unguided baseline `base` (empty: feasible)."""
    out = []
    n = max(n, 1)
    tol = math.sqrt(max(base.precision * (1 - base.precision), 1 / n) / n)  # at least one sample's worth
    if c.precision < base.precision - tol:
        out.append(f"precision {c.precision:.3f} < unguided {base.precision:.3f} - {tol:.3f}")
    if c.coverage < COVERAGE_FRACTION * base.coverage:
        out.append(f"coverage {c.coverage:.3f} < {COVERAGE_FRACTION} x unguided {base.coverage:.3f}")
    if c.spread < SPREAD_FRACTION * base.spread:
        out.append(f"spread {c.spread:.3g} < {SPREAD_FRACTION} x unguided {base.spread:.3g} (collapse)")
    tv_se = class_tv_standard_error(n)
    if c.class_tv is not None and base.class_tv is not None and c.class_tv > base.class_tv + CLASS_TV_MARGIN + tv_se:
        out.append(
            f"class histogram off the plan by {c.class_tv:.3f} > unguided {base.class_tv:.3f} + {CLASS_TV_MARGIN}"
            f" + {tv_se:.3f} (its standard error)"
        )
    what, value, baseline = "garbage", c.garbage, base.garbage
    if scoring_garbage_meaningless(base) and c.outside is not None and base.outside is not None:
        what, value, baseline = "garbage (outside the support)", c.outside, base.outside
    g_tol = max(GARBAGE_MARGIN, math.sqrt(baseline * (1 - baseline) / n))  # at least its standard error
    if value > baseline + g_tol:
        out.append(f"{what} {value:.3f} > unguided {baseline:.3f} + {g_tol:.3f}")
    return out


def choose(candidates: list[Candidate], base: Candidate) -> tuple[float, str]:
    """(strength, reason): the feasible candidate with the lowest MMD², if below unguided; else 0."""
    feasible = [c for c in candidates if c.strength > 0 and c.feasible]
    if not feasible:
        return 0.0, "no candidate strength met the constraints: guidance off"
    best = min(feasible, key=lambda c: (c.mmd2, c.strength))
    if best.mmd2 >= base.mmd2:
        return 0.0, f"no feasible candidate beat unguided (MMD² {base.mmd2:.4g}): guidance off"
    return best.strength, f"lowest MMD² among {len(feasible)} feasible candidate(s)"


@dataclass
class Search:
    """What `search` tried and chose."""

    baseline: Candidate
    candidates: list[Candidate]  # in the order tried
    chosen: float
    reason: str
    notes: list[str] = field(default_factory=list)  # what it did beyond doubling and refining, in words
    dropped: list[str] = field(default_factory=list)  # constraints dropped as meaningless
    extended: bool = False  # the doubling went past max_strength
    bound_chose: str | None = None  # the bound (setting name) that chose the strength, None: the data chose


def search(
    evaluate: Callable[[float], Candidate],
    start: float,
    max_strength: float,
    n: int,
    *,
    min_strength: float | None = None,
    hard_max_strength: float | None = None,
) -> Search:
    """Double from `start` while candidates stay feasible and improve on the best so far; halve instead
    (down to `min_strength`, default `start`: no halving) when the first candidate is infeasible or the best;
    when `max_strength` rather than the data stops the doubling, go on up to `hard_max_strength` (default
    `max_strength`: no extension); then try ×√2 on either side of the best, and `choose`."""
    lo = start if min_strength is None else min(min_strength, start)
    hi = max_strength
    cap = max(max_strength, hard_max_strength if hard_max_strength is not None else max_strength)
    below, above = 1 - 1e-9, 1 + 1e-9
    base = evaluate(0.0)
    base.feasible, base.violations = True, []
    result = Search(base, [], 0.0, "")
    if scoring_garbage_meaningless(base):
        result.dropped.append("garbage in the scoring space")
        result.notes.append(
            f"the scoring-space garbage rule flags {base.far:.0%} of the unguided samples (> "
            f"{MEANINGLESS_GARBAGE:.0%}): meaningless in this space, dropped; garbage is judged by the "
            "latent-support rule alone"
        )
    tried: dict[float, Candidate] = {}

    def run(s: float) -> Candidate:
        key = round(s, 12)
        if key not in tried:
            c = evaluate(s)
            c.violations = is_feasible(c, base, n)
            c.feasible = not c.violations
            tried[key] = c
        return tried[key]

    best: Candidate | None = None
    top_reached = False  # a bound, not the data, stopped the doubling at `cap`
    s = start
    while True:
        if s > hi * above:
            if hi < cap and best is not None:
                result.extended = True
                result.notes.append(
                    f"the best candidate ({best.strength:g}) is the largest pilot_max_strength ({hi:g}) allows: "
                    f"doubling on up to pilot_hard_max_strength ({cap:g})"
                )
                hi = cap
                continue
            top_reached = best is not None
            break
        c = run(s)
        if not c.feasible or (best is not None and c.mmd2 >= best.mmd2):
            break
        best = c
        s *= 2
    bottom_reached = False  # the floor, not the data, stopped the halving
    first = tried[round(start, 12)]
    if lo < start and (best is None or best is first):
        if not first.feasible:
            result.notes.append(
                f"the first candidate ({start:g}) broke a constraint ({first.violations[0]}): halving down to "
                f"pilot_min_strength ({lo:g})"
            )
        s = start / 2
        while True:
            if s < lo * below:
                bottom_reached = True
                break
            c = run(s)
            if c.feasible and (best is None or c.mmd2 < best.mmd2):
                best = c
            elif c.feasible or best is not None:  # no better, or infeasible below a feasible one
                break
            s /= 2
        if best is None:
            result.notes.append(f"no strength from {start:g} down to {lo:g} met the constraints")
    if best is not None:
        for s in (best.strength / math.sqrt(2), best.strength * math.sqrt(2)):
            if lo * below <= s <= hi * above:
                run(s)
    result.candidates = list(tried.values())
    result.chosen, result.reason = choose(result.candidates, base)
    strengths = [c.strength for c in result.candidates]
    if result.chosen > 0 and top_reached and result.chosen == max(strengths):
        result.bound_chose = "pilot_hard_max_strength" if cap > max_strength else "pilot_max_strength"
        result.reason += (
            f"; it is the largest strength the pilot may try ({result.bound_chose} {cap:g}): the cap, not the "
            "data, chose it"
        )
    elif result.chosen > 0 and bottom_reached and result.chosen == min(strengths):
        result.bound_chose = "pilot_min_strength"
        result.reason += (
            f"; it is the smallest strength the pilot may try (pilot_min_strength {lo:g}): the floor, not the "
            "data, chose it"
        )
    return result


# ------------------------------------------------------------------------------------------ settings


def pilot_settings(cfg: AugmentConfig) -> dict[str, Any]:
    """The config fields the pilot's outcome depends on."""
    return {k: v for k, v in cfg.hashed_fields().items() if k not in IRRELEVANT_FIELDS}


def pilot_key(cfg: AugmentConfig, reference_hash: str, model_id: str, files: list[str]) -> str:
    """sha256 of (pilot version, references' content hash, model id, the references the job guides with
    (after `--holdout`), settings)."""
    payload = {
        "version": PILOT_VERSION,
        "references": reference_hash,
        "model": model_id,
        "files": files,
        "settings": pilot_settings(cfg),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def feature_space(
    model_spec: str | None, channels: int, size: int, references: torch.Tensor, digits: torch.Tensor | None = None
) -> FeatureExtractor:
    """The pilot's scoring space, never the guided latent space.

    The shipped classifier's penultimate features when the run uses the shipped prior *and* the classifier
    reads the (decoded, held-out) `references`: accuracy >= READABLE on their `digits` when the class folders
    are digits, else a mean top-class probability >= READABLE. A shift it cannot read (a grey background,
    heavy noise) puts its features out of their range, where distances mean nothing. Otherwise the decoded
    images downsampled to at most PIXEL_FEATURE_SIZE: coarse structure (stroke, slant, layout, contrast,
    colour) without texture-level noise.
    """
    if model_spec in (None, "shipped") and shipped_classifier_available():
        clf = load_shipped_classifier()
        extractor = classifier_extractor(clf)
        with torch.no_grad():
            probs = torch.cat([clf.fc(extractor.fn(c)).softmax(1).cpu() for c in references.split(256)])
        if digits is not None:
            read = float((probs.argmax(1) == digits.cpu()).double().mean())
            how = "accuracy"
        else:
            read = float(probs.max(1).values.double().mean())
            how = "mean confidence"
        if read >= READABLE:
            extractor.description += f" (its {how} on the held-out references: {read:.2f})"
            return extractor
        log.info("pilot: the shipped classifier cannot read these references (%s %.2f): pixel features", how, read)
    side = min(size, PIXEL_FEATURE_SIZE)
    return FeatureExtractor(
        "pixels",
        f"decoded images at {side}x{side} pixels",
        lambda x: fit_images(x, channels, side).flatten(1),
    )


def class_tv(judged: torch.Tensor, proportions: torch.Tensor) -> float:
    """Total variation ½ Σ_c |share_c − p_c| between judged classes (−1: other) and the planned proportions."""
    k = len(proportions)
    counts = torch.bincount(judged.clamp_min(-1) + 1, minlength=k + 1).double()
    share = counts / counts.sum()
    planned = torch.cat([torch.zeros(1, dtype=torch.float64), proportions.double()])
    return float(0.5 * (share - planned).abs().sum())


# ------------------------------------------------------------------------------------------ running


def pilot_seed(cfg: AugmentConfig) -> int:
    """The pilot's seed (its split of the references and its samples), from the run seed."""
    return derive_seed("pilot", cfg.seed) & 0x7FFFFFFF


def split_for_pilot(bundle: Any, fraction: float, seed: int) -> tuple[Any, torch.Tensor | None, str | None]:
    """(guide part, held-out mask over `bundle.files`, None) for a `reference.ReferenceBundle`; or (None, None,
    reason) when there are too few references to guide with and hold out MIN_PILOT_REFERENCES each."""
    from .reference import split_holdout

    try:
        guide = split_holdout(bundle, fraction, seed)
    except ValueError:
        guide = None
    held_mask = torch.tensor([f in set(guide.heldout_files) for f in bundle.files]) if guide else None
    if guide is None or int(held_mask.sum()) < MIN_PILOT_REFERENCES:
        return (
            None,
            None,
            (
                f"too few references for a pilot ({len(bundle.files)}; it needs {MIN_PILOT_REFERENCES} to guide and "
                f"{MIN_PILOT_REFERENCES} held out at pilot_holdout={fraction}): fallback strength"
            ),
        )
    return guide, held_mask, None


def describe_pilot(cfg: AugmentConfig, bundle: Any) -> str:
    """The plan's line about the strength for these references (`--dry-run`; no model needed: only the
    bundle's files and labels are read)."""
    if cfg.guidance == "none":
        return "strength: guidance is none, no strength to choose"
    if cfg.strength != "auto":
        return f"strength {cfg.strength:g} (given: no pilot)"
    _, held_mask, reason = split_for_pilot(bundle, cfg.pilot_holdout, pilot_seed(cfg))
    if reason is not None:
        return f"strength auto: the pilot will be skipped: {reason} {FALLBACK_STRENGTH:g}"
    return (
        f"strength auto: a pilot chooses it at the start ({cfg.pilot_samples} samples per candidate strength, "
        f"scored against {int(held_mask.sum())} held-out references)"
    )


def run_pilot(ctx: Any) -> dict[str, Any]:
    """Run the search for a `worker.JobContext` whose config says strength 'auto'; returns the record
    (JSON-ready): key, chosen, reason, baseline, candidates, notes, dropped constraints, whether the range
    was extended and which bound chose (if one did), feature space, counts, seconds, cost."""
    from .reference import build_target
    from .worker import JobContext, generate

    cfg: AugmentConfig = ctx.cfg
    bundle = ctx.bundle
    t0 = time.perf_counter()
    base_record = {
        "version": PILOT_VERSION,
        "requested": "auto",
        "settings": {
            "samples": cfg.pilot_samples,
            "holdout": cfg.pilot_holdout,
            "start": cfg.pilot_start,
            "max_strength": cfg.pilot_max_strength,
            "min_strength": cfg.pilot_min_strength,
            "hard_max_strength": cfg.pilot_hard_max_strength,
        },
    }
    if cfg.guidance == "none":
        return dict(base_record, chosen=0.0, reason="guidance is none: no strength to choose", candidates=[])
    seed = pilot_seed(cfg)
    guide, held_mask, reason = split_for_pilot(bundle, cfg.pilot_holdout, seed)
    if reason is not None:
        log.warning("strength auto: %s %g", reason, FALLBACK_STRENGTH)
        return dict(base_record, chosen=FALLBACK_STRENGTH, reason=reason, candidates=[])
    model = ctx.model
    held_latents = bundle.latents[held_mask]
    guide_target = build_target(cfg, guide, model.device)
    held_images = model.decode(held_latents.to(model.device), batch_size=cfg.batch_size)
    digits = None
    if ctx.model_labels is not None and bundle.labels is not None:
        digits = torch.tensor([ctx.model_labels[int(c)] for c in bundle.labels[held_mask]])
    features = feature_space(cfg.model, model.image_channels, model.image_size, held_images, digits)
    held_feats = extract(features, held_images)
    bandwidth = float(median_pairwise_distance(held_feats))
    ref_feats = torch.cat([held_feats, extract(features, model.decode(guide.latents.to(model.device)))])
    kernel = RBFKernel(bandwidth)
    n = cfg.pilot_samples
    pilot_cfg = cfg.model_copy(update={"seed": seed, "strength": 0.0})
    labels = assign_classes(pilot_cfg, ShardPlan(0, 0, n, n), ctx.proportions)
    k = max(1, min(PRDC_K, n - 1, len(held_feats) - 1))

    def evaluate(strength: float) -> Candidate:
        t = time.perf_counter()
        sub = JobContext(
            replace_cfg(pilot_cfg, strength),
            model,
            guide,
            guide_target,
            ctx.proportions,
            ctx.model_labels,
            judge=ctx.judge,
        )
        latents = generate(sub, range(n), labels)
        images = model.decode(latents.to(model.device), batch_size=cfg.batch_size)
        feats = extract(features, images)
        quality = prdc(feats, held_feats, k=k)
        outside = nearest_reference_distance(latents, guide.latents) > cfg.support_radius * bundle.bandwidth
        far = torch.tensor(garbage(feats, ref_feats)["mask"], dtype=torch.bool)
        tv = None
        if labels is not None and ctx.judge is not None and ctx.proportions is not None:
            tv = class_tv(ctx.judge(latents, images), ctx.proportions)
        c = Candidate(
            strength=strength,
            mmd2=float(mmd2(feats, held_feats, kernel, unbiased=True)),
            precision=quality["precision"],
            recall=quality["recall"],
            coverage=quality["coverage"],
            garbage=float((outside | far).double().mean()),
            spread=float(nearest_neighbour_distances(feats).median()),
            class_tv=tv,
            seconds=time.perf_counter() - t,
            outside=float(outside.double().mean()),
            far=float(far.double().mean()),
        )
        log.info(
            "pilot s=%g: MMD² %.4g, precision %.3f, coverage %.3f, garbage %.3f (outside %.3f, far %.3f)%s (%.1f s)",
            strength,
            c.mmd2,
            c.precision,
            c.coverage,
            c.garbage,
            c.outside,
            c.far,
            "" if tv is None else f", class TV {tv:.3f}",
            c.seconds,
        )
        return c

    found = search(
        evaluate,
        cfg.pilot_start,
        cfg.pilot_max_strength,
        n,
        min_strength=cfg.pilot_min_strength,
        hard_max_strength=cfg.pilot_hard_max_strength,
    )
    for note in found.notes:
        log.warning("strength auto: %s", note)
    baseline, candidates, chosen, reason = found.baseline, found.candidates, found.chosen, found.reason
    seconds = time.perf_counter() - t0
    generated = n * (1 + len(candidates))
    record = dict(
        base_record,
        chosen=chosen,
        reason=reason,
        feature_space=features.description,
        guide_references=len(guide.files),
        heldout_references=int(held_mask.sum()),
        baseline=asdict(baseline),
        candidates=[asdict(c) for c in candidates],
        notes=found.notes,
        dropped_constraints=found.dropped,
        extended=found.extended,
        bound_chose=found.bound_chose,
        samples_generated=generated,
        seconds=round(seconds, 3),
        job_generated=primary_count(cfg),
        cost_fraction_of_job=generated / primary_count(cfg),
    )
    log.info(
        "strength auto: chose %g (%s) from %d candidates in %.1f s, %d samples (%.1f%% of this job's)",
        chosen,
        reason,
        len(candidates),
        seconds,
        generated,
        100 * record["cost_fraction_of_job"],
    )
    return record


def replace_cfg(cfg: AugmentConfig, strength: float) -> AugmentConfig:
    return cfg.model_copy(update={"strength": float(strength)})


__all__ = [
    "Candidate",
    "Search",
    "choose",
    "class_tv",
    "class_tv_standard_error",
    "describe_pilot",
    "feature_space",
    "is_feasible",
    "pilot_key",
    "pilot_seed",
    "pilot_settings",
    "run_pilot",
    "scoring_garbage_meaningless",
    "search",
    "split_for_pilot",
]
