"""`--strength auto`: choose the guidance strength per job with a pilot on a held-out split of the references.

The right strength depends on how far the target is from the prior, so a fixed default does not transfer
between domains. Before the job, the pilot:

1. splits the references (stratified, seeded) into a *guide* part (what the pilot steers towards) and a
   *held-out* part (`pilot_holdout`, what it scores against);
2. generates one batch per candidate strength of a geometric ladder (`pilot_start` × `pilot_factor`^k up to
   `pilot_max_strength`: 0.01, 0.02, ... 1.28 by default), plus the unguided baseline (s = 0), with the
   job's sampler, steps, classes and batch coupling, every candidate from the same seeds (common random
   numbers: differences between candidates come from the strength, not from the noise). Its size
   (`pilot_samples`, 'auto' by default) grows with the job: `pilot_budget` (5%) of the job's samples shared
   by the batches, 64 to 512 per candidate, so a 100,000-sample job buys a far less noisy pilot;
3. scores each candidate by alignment to the held-out part in a feature space *other than the guided
   latent space* (the shipped digit classifier's penultimate features for the shipped prior when the
   classifier can read the references, else the decoded images downsampled to at most 32×32 pixels; see
   `feature_space`): unbiased RBF MMD² (median bandwidth of the held-out features), lower is better;
4. on what the job keeps: with the label filter on (`label_filter`, `auto`: where the judge is the shipped
   classifier) the samples the judge assigns to another class are left out of every score, as the job discards
   them (and the filter may discard at most half a candidate's samples, `KEPT_MIN`: the job's reserve replaces
   them); under constraints that keep alignment from being bought with fidelity or diversity (MMD² alone calls a
   collapse onto one blob shape "better"), each gap to unguided judged against its paired bootstrap standard
   error on the MMD²'s own draws (`paired_constraint_ses`: infeasible only beyond it):
   - precision no lower than unguided (within one binomial standard error of the pilot batch; k = 3),
   - coverage at least 0.9 × unguided, and the median distance from a sample to its nearest other sample
     at least half of unguided's (no collapse onto a few shapes: near-duplicates drive it to 0),
   - labelled runs: the judged class histogram no further from the plan than unguided + 0.1 in total
     variation, plus one standard error of that distance on the pilot batch (1/(2√n), 0.0625 at n = 64:
     the smallest step must not be refused for sampling noise; `class_tv_standard_error`),
   - labelled runs: label agreement (judged class = target class) at most 5 points below unguided's (or its
     standard error, if larger): guidance that flips labels makes data that hurts downstream,
   - garbage at most unguided + 2 points (or + its binomial standard error, if larger): samples outside
     the guide references' support (the filter's rule, latent space) or, in the scoring space, farther
     from every reference than any reference is from its nearest other one (`measures.metrics.garbage`).
     Where that scoring-space rule flags more than half of the *unguided* samples it means nothing there
     (decoded pixels of a domain the prior cannot draw): it is dropped, said so in the record and the log,
     and garbage is judged by the latent-support rule alone;
5. scores every candidate of the ladder (`search`: no early stop: where noise first breaks a constraint must not
   decide the choice; the whole ladder costs ~5% of a 10,000-sample job), with a paired bootstrap of the held-out
   MMD² (`bootstrap_mmd2`: samples and held-out references resampled with the same counts for every candidate),
   and chooses by `pilot_rule` (`choose`): by default the feasible candidate in the *middle* (on the geometric
   ladder) of those whose MMD² is within one standard error (of its difference to the lowest) of the lowest.
   MMD² on a few dozen held-out references is flat within noise over a wide range of strengths; the lowest of
   equal values flips with the seed, and so do both ends of the flat range (the strongest flipped ×16 on the
   yardstick's domains, docs/results.md §8), while their middle moves half as far. Guidance is off (0) when no
   feasible candidate beats unguided; when the choice is the strongest strength of the ladder, the record says
   the cap, not the data, chose it.

Its record (candidates, scores, constraints, choice, cost) goes to `run.json` and the eval report; it is
cached per references, model and settings (`storage.pilot`); what the search did beyond scoring the ladder
(a skipped top, a dropped constraint) is in its `notes`, what each rule would have chosen in `choices`. The
search, the bootstrap and the choice are pure functions (`search`, `bootstrap_mmd2`, `choose`, `is_feasible`)
tested on constructed cases.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from guidance import RBFKernel, nearest_reference_distance
from guidance.kernels import median_pairwise_distance
from storage.pilot import load_pilot, pilot_cache_path, save_pilot

from ..config import PILOT_MAX_SAMPLES, PILOT_MIN_SAMPLES, AugmentConfig
from ..measures.features import (
    FeatureExtractor,
    classifier_extractor,
    extract,
    fit_images,
    load_shipped_classifier,
    shipped_classifier_available,
)
from ..measures.metrics import garbage, nearest_neighbour_distances, prdc
from ..plan import ShardPlan, assign_classes, primary_count
from ..seeding import derive_seed
from .fidelity import READABLE, label_filter_on  # READABLE: the shipped classifier scores the pilot where it reads

log = logging.getLogger(__name__)

#: 3: the whole ladder scored, paired bootstrap SEs, a rule that accounts for them; 4: no early stop below a
#: feasible candidate, and label agreement within AGREEMENT_MARGIN of unguided; 5: scored on what the job keeps
#: (after the label filter when it is on), the constraints judged against their paired bootstrap standard errors;
#: 6: the whole ladder scored (no early stop), the `middle` rule by default
PILOT_VERSION = 6

#: Config fields the pilot's outcome does not depend on (besides the runtime-only ones).
IRRELEVANT_FIELDS = frozenset(
    {"n", "shard_size", "prefix", "keep", "save_latents", "keep_rejected", "reserve", "strength"} | {"pseudo_labels"}
)

#: Constraint margins (see the module doc).
COVERAGE_FRACTION = 0.9
SPREAD_FRACTION = 0.5
PRDC_K = 3
CLASS_TV_MARGIN = 0.1
#: Label agreement (judged class = target class) may fall at most this far below unguided's (or its standard
#: error, if larger): strong guidance that flips 20% of the labels (the label filter then discards them, and
#: what it keeps is the ambiguous rest) cost 2-9 points downstream in the decision suite.
AGREEMENT_MARGIN = 0.05
GARBAGE_MARGIN = 0.02
#: With the label filter on, the job discards the samples judged another class and replaces them from its reserve
#: (by default as many as the pool): a candidate may lose at most half its samples to the filter.
KEPT_MIN = 0.5
#: A scoring-space garbage rule that flags more than this fraction of the unguided samples is meaningless there.
MEANINGLESS_GARBAGE = 0.5

#: The pilot needs at least this many references in each part; fewer and the job uses FALLBACK_STRENGTH.
MIN_PILOT_REFERENCES = 8
FALLBACK_STRENGTH = 0.01  # the sweep's best on the two example domains (docs/results.md §3.1)

#: Largest side of the downsampled-pixel feature space (models without the shipped classifier).
PIXEL_FEATURE_SIZE = 32


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
    agreement: float | None = None  # labelled: share of samples the label judge assigns to their target class
    kept: float | None = None  # label filter on: the share of samples it keeps (every other score is of those)
    mmd2_se: float | None = None  # bootstrap standard error of `mmd2`
    constraint_se: dict[str, float] = field(default_factory=dict)  # paired bootstrap SE of each constraint's gap
    gap_se: float | None = None  # bootstrap standard error of mmd2 − the lowest feasible mmd2 (paired)
    within_se: bool | None = None  # feasible, and mmd2 within `gap_se` of the lowest


def class_tv_standard_error(n: int) -> float:
    """A bound on the standard error of the total variation between an `n`-sample class histogram and a
    fixed plan, whatever the classes' shares: 1/(2√n)."""
    # TV^ − TV ≈ ½ Σ_k s_k (p^_k − p_k), s_k = sign(p_k − q_k): variance (1 − (Σ_k s_k p_k)²)/(4n) ≤ 1/(4n)
    return 0.5 / math.sqrt(max(n, 1))


def scoring_garbage_meaningless(base: Candidate) -> bool:
    """Whether the scoring-space garbage rule flags most unguided samples (then it constrains nothing)."""
    return base.far is not None and base.far > MEANINGLESS_GARBAGE


def is_feasible(c: Candidate, base: Candidate, n: int) -> list[str]:
    """The constraints `c` violates against the unguided baseline `base` (empty: feasible). A gap counts only
    beyond its standard error: the paired bootstrap's (`c.constraint_se`, from `paired_constraint_ses`) where the
    candidate carries one, else the binomial one of the pilot batch."""
    out = []
    n = max(n, 1)
    se = c.constraint_se
    tol = se.get("precision", math.sqrt(max(base.precision * (1 - base.precision), 1 / n) / n))
    if c.precision < base.precision - tol:
        out.append(f"precision {c.precision:.3f} < unguided {base.precision:.3f} - {tol:.3f}")
    c_tol = se.get("coverage", 0.0)
    if c.coverage < COVERAGE_FRACTION * base.coverage - c_tol:
        out.append(
            f"coverage {c.coverage:.3f} < {COVERAGE_FRACTION} x unguided {base.coverage:.3f}"
            + (f" - {c_tol:.3f}" if c_tol else "")
        )
    if c.kept is not None and c.kept < KEPT_MIN:
        out.append(f"the label filter keeps {c.kept:.3f} of the samples < {KEPT_MIN}")
    if c.spread < SPREAD_FRACTION * base.spread:
        out.append(f"spread {c.spread:.3g} < {SPREAD_FRACTION} x unguided {base.spread:.3g} (collapse)")
    tv_se = class_tv_standard_error(n)
    if c.class_tv is not None and base.class_tv is not None and c.class_tv > base.class_tv + CLASS_TV_MARGIN + tv_se:
        out.append(
            f"class histogram off the plan by {c.class_tv:.3f} > unguided {base.class_tv:.3f} + {CLASS_TV_MARGIN}"
            f" + {tv_se:.3f} (its standard error)"
        )
    if c.agreement is not None and base.agreement is not None:
        a_tol = max(AGREEMENT_MARGIN, se.get("agreement", math.sqrt(2 * base.agreement * (1 - base.agreement) / n)))
        if c.agreement < base.agreement - a_tol:
            out.append(f"label agreement {c.agreement:.3f} < unguided {base.agreement:.3f} - {a_tol:.3f}")
    what, value, baseline = "garbage", c.garbage, base.garbage
    if scoring_garbage_meaningless(base) and c.outside is not None and base.outside is not None:
        what, value, baseline = "garbage (outside the support)", c.outside, base.outside
    g_se = se.get("outside" if what != "garbage" else "garbage", math.sqrt(baseline * (1 - baseline) / n))
    g_tol = max(GARBAGE_MARGIN, g_se)  # at least its standard error
    if value > baseline + g_tol:
        out.append(f"{what} {value:.3f} > unguided {baseline:.3f} + {g_tol:.3f}")
    return out


def ladder(start: float, max_strength: float, factor: float) -> list[float]:
    """The candidate strengths: start × factor^k for k = 0, 1, ... up to `max_strength` (inclusive, up to
    float rounding)."""
    out, s = [], float(start)
    while s <= max_strength * (1 + 1e-9):
        out.append(s)
        s *= factor
    return out


def samples_per_candidate(cfg: AugmentConfig, candidates: int) -> int:
    """`pilot_samples`, or for 'auto' `pilot_budget` of the job's generated samples shared by the unguided
    baseline and the `candidates` strengths, clamped to [PILOT_MIN_SAMPLES, PILOT_MAX_SAMPLES]: a small job
    keeps a small pilot, a large one buys the pilot less noise."""
    if cfg.pilot_samples != "auto":
        return int(cfg.pilot_samples)
    share = int(cfg.pilot_budget * primary_count(cfg) / (candidates + 1))
    return max(PILOT_MIN_SAMPLES, min(PILOT_MAX_SAMPLES, share))


def bootstrap_weights(n: int, m: int, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial resampling counts ([draws, n] over samples, [draws, m] over held-out references), float64.
    Shared by every candidate: sample i of every candidate comes from the same seed (common random numbers),
    so resampling i resamples the same noise in each, and the differences between candidates are paired."""
    g = torch.Generator().manual_seed(seed)
    w = torch.multinomial(torch.full((n,), 1.0 / n), n * draws, replacement=True, generator=g).view(draws, n)
    v = torch.multinomial(torch.full((m,), 1.0 / m), m * draws, replacement=True, generator=g).view(draws, m)
    count = lambda idx, size: torch.zeros(draws, size, dtype=torch.float64).scatter_add_(  # noqa: E731
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    return count(w, n), count(v, m)


def _weighted_within(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j} w_i w_j k_ij / Σ_{i≠j} w_i w_j for each row of weights w [B, n] (k [n, n]): the U-statistic
    mean of a kernel block under resampling counts (pairs of one point with itself never count)."""
    diag = torch.diagonal(k)
    num = ((w @ k) * w).sum(1) - (w * w * diag).sum(1)
    den = w.sum(1) ** 2 - (w * w).sum(1)
    return num / den


def _weighted_cross(k: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_ir w_i v_r k_ir / (Σ w · Σ v) for each row of weights w [B, n], v [B, m] (k [n, m])."""
    return ((w @ k) * v).sum(1) / (w.sum(1) * v.sum(1))


def bootstrap_mmd2(
    features: list[torch.Tensor],
    held: torch.Tensor,
    kernel: Any,
    draws: int,
    seed: int,
    masks: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MMD²_u of each feature set against `held` [C], paired bootstrap replicates [C, draws]).

    MMD²_u = mean_{i≠j} k(x_i,x_j) + mean_{r≠r'} k(y_r,y_r') − 2 mean k(x_i,y_r) (Gretton et al. 2012, eq. 3);
    each replicate reweights samples and references by multinomial counts shared by every set (all sets have
    as many samples, index i drawn from the same seed), so `replicates[a] − replicates[b]` is the bootstrap
    distribution of the difference a − b. With unit weights the replicate is MMD²_u exactly. `masks` ([n] 0/1
    per set, None: all) restrict a set to its kept samples (weight 0 for the others): MMD²_u of the subset.
    """
    n, m = len(features[0]), len(held)
    w, v = bootstrap_weights(n, m, draws, seed)
    ones_w, ones_v = torch.ones(1, n, dtype=torch.float64), torch.ones(1, m, dtype=torch.float64)
    held = held.double()
    k_yy = kernel.matrix(held, held).double()
    yy, yy_1 = _weighted_within(k_yy, v), _weighted_within(k_yy, ones_v)
    values, replicates = [], []
    for x, mask in zip(features, masks or [None] * len(features), strict=True):
        if len(x) != n:
            raise ValueError(f"every candidate needs the same number of samples ({n}), got {len(x)}")
        x = x.double()
        keep = torch.ones(n, dtype=torch.float64) if mask is None else mask.double().reshape(n)
        k_xx, k_xy = kernel.matrix(x, x).double(), kernel.matrix(x, held).double()
        ones_k, w_k = ones_w * keep, w * keep
        values.append(_weighted_within(k_xx, ones_k) + yy_1 - 2 * _weighted_cross(k_xy, ones_k, ones_v))
        replicates.append(_weighted_within(k_xx, w_k) + yy - 2 * _weighted_cross(k_xy, w_k, v))
    return torch.cat(values), torch.stack(replicates)


def paired_constraint_ses(c: Candidate, base: Candidate, w: torch.Tensor) -> dict[str, float]:
    """Paired bootstrap standard errors of the constraints' gaps between `c` and `base`, on the MMD² bootstrap's
    own sample draws `w` [draws, n] (sample i of both comes from one seed: resampling it resamples both).

    Uses the per-sample indicators a candidate's scorer leaves in `c.per_sample` (`kept`: what the job keeps;
    `in_ball`, `garbage`, `outside`, `agree`: [n] 0/1; `hits`: [n, m] sample-in-reference-ball), each statistic
    a weighted mean over the kept samples (coverage: the share of references a kept, drawn sample hits). Empty
    when either lacks them (then `is_feasible` falls back to binomial errors)."""
    pc, pb = getattr(c, "per_sample", None), getattr(base, "per_sample", None)
    if pc is None or pb is None:
        return {}
    wc, wb = w * pc["kept"], w * pb["kept"]

    def mean(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (weights * x).sum(1) / weights.sum(1).clamp_min(1e-12)

    def coverage(weights: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        return ((weights @ hits) > 0).double().mean(1)

    out = {
        "precision": float((mean(wc, pc["in_ball"]) - mean(wb, pb["in_ball"])).std()),
        "garbage": float((mean(wc, pc["garbage"]) - mean(wb, pb["garbage"])).std()),
        "outside": float((mean(wc, pc["outside"]) - mean(wb, pb["outside"])).std()),
        "coverage": float((coverage(wc, pc["hits"]) - COVERAGE_FRACTION * coverage(wb, pb["hits"])).std()),
    }
    if "agree" in pc and "agree" in pb:  # agreement is of what the judge sees, before the filter
        out["agreement"] = float((mean(w, pc["agree"]) - mean(w, pb["agree"])).std())
    return out


def choose(
    candidates: list[Candidate],
    base: Candidate,
    replicates: dict[float, torch.Tensor] | None = None,
    rule: str = "lowest",
) -> tuple[float, str]:
    """(strength, reason) by `rule` among the feasible candidates (s > 0), guidance off (0) when none is
    feasible or the lowest held-out MMD² does not beat unguided:

    - lowest: the lowest MMD²;
    - strongest / weakest: the strongest / weakest candidate whose MMD² is within one standard error of the
      lowest, the standard error of the *difference* to the lowest from the paired bootstrap `replicates`
      (strength -> [draws]). Candidates equal within noise then do not flip the choice with the seed;
    - middle: the candidate within one standard error nearest the middle of that range on the (geometric)
      ladder, ties to the stronger: both ends of a flat MMD² range move with the seed, their middle half as far.

    Sets each candidate's `gap_se` and `within_se` (feasible ones)."""
    feasible = [c for c in candidates if c.strength > 0 and c.feasible]
    if not feasible:
        return 0.0, "no candidate strength met the constraints: guidance off"
    best = min(feasible, key=lambda c: (c.mmd2, c.strength))
    if best.mmd2 >= base.mmd2:
        return 0.0, f"no feasible candidate beat unguided (MMD² {base.mmd2:.4g}): guidance off"
    if rule == "lowest" or replicates is None:
        return best.strength, f"lowest MMD² among {len(feasible)} feasible candidate(s)"
    for c in feasible:
        c.gap_se = float((replicates[c.strength] - replicates[best.strength]).std())
        c.within_se = c.mmd2 - best.mmd2 <= c.gap_se
    close = sorted((c for c in feasible if c.within_se), key=lambda c: c.strength)
    if rule == "middle":  # ladder positions: the ladder is geometric, so its middle is in log strength
        position = {s: i for i, s in enumerate(sorted(c.strength for c in candidates))}
        centre = (position[close[0].strength] + position[close[-1].strength]) / 2
        pick = min(close, key=lambda c: (abs(position[c.strength] - centre), -c.strength))
    else:
        pick = close[-1] if rule == "strongest" else close[0]
    return pick.strength, (
        f"the {rule} of {len(close)} feasible candidate(s) within one standard error of the lowest MMD² "
        f"({best.mmd2:.4g} at s={best.strength:g})"
    )


@dataclass
class Search:
    """What `search` tried and chose."""

    baseline: Candidate
    candidates: list[Candidate]  # in the order tried
    chosen: float
    reason: str
    notes: list[str] = field(default_factory=list)  # what it did beyond scoring the ladder, in words
    dropped: list[str] = field(default_factory=list)  # constraints dropped as meaningless
    choices: dict[str, float] = field(default_factory=dict)  # what each rule would choose from these scores
    bound_chose: str | None = None  # the bound (setting name) that chose the strength, None: the data chose


#: The rules `choose` knows (`pilot_rule`); the record says what each would choose.
RULES = ("lowest", "weakest", "middle", "strongest")


def search(
    evaluate: Callable[[float], tuple[Candidate, torch.Tensor]],
    strengths: list[float],
    n: int,
    held: torch.Tensor,
    kernel: Any,
    *,
    rule: str = "middle",
    draws: int = 200,
    seed: int = 0,
) -> Search:
    """Score the unguided baseline and every strength of the ladder (ascending, no early stop: the choice must
    not depend on where noise first broke a constraint), each from the same seeds;
    `evaluate(s)` returns the candidate's scores and its samples' features. MMD² values and their standard
    errors come from `bootstrap_mmd2` against the `held` features; `choose` by `rule`."""
    base, base_feats = evaluate(0.0)
    base.feasible, base.violations = True, []
    result = Search(base, [], 0.0, "")
    if scoring_garbage_meaningless(base):
        result.dropped.append("garbage in the scoring space")
        result.notes.append(
            f"the scoring-space garbage rule flags {base.far:.0%} of the unguided samples (> "
            f"{MEANINGLESS_GARBAGE:.0%}): meaningless in this space, dropped; garbage is judged by the "
            "latent-support rule alone"
        )
    feats = [base_feats]
    w, _ = bootstrap_weights(n, len(held), draws, seed)  # the MMD² bootstrap's own draws (same seed)
    for s in sorted(strengths):
        c, f = evaluate(s)
        c.constraint_se = paired_constraint_ses(c, base, w)
        c.violations = is_feasible(c, base, n)
        c.feasible = not c.violations
        result.candidates.append(c)
        feats.append(f)
    everyone = [base, *result.candidates]
    masks = [getattr(c, "per_sample", {}).get("kept") for c in everyone]
    values, reps = bootstrap_mmd2(feats, held, kernel, draws, seed, masks)
    for c, value, rep in zip(everyone, values.tolist(), reps, strict=True):
        c.mmd2, c.mmd2_se = value, float(rep.std())
    replicates = {c.strength: rep for c, rep in zip(everyone, reps, strict=True)}
    for other in RULES:
        result.choices[other] = choose(result.candidates, base, replicates, other)[0]
    result.chosen, result.reason = choose(result.candidates, base, replicates, rule)
    tried = [c.strength for c in result.candidates]
    if result.chosen > 0 and result.chosen == max(strengths) and len(tried) > 1:
        result.bound_chose = "pilot_max_strength"
        result.reason += f"; it is the strongest the pilot tries ({max(strengths):g}): the cap, not the data, chose it"
    elif result.chosen > 0 and result.chosen == result.choices["lowest"] == min(strengths) and len(tried) > 1:
        result.bound_chose = "pilot_start"
        result.reason += f"; it is the weakest the pilot tries ({min(strengths):g}): the floor, not the data, chose it"
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
        "samples": samples_per_candidate(cfg, len(ladder(cfg.pilot_start, cfg.pilot_max_strength, cfg.pilot_factor))),
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
    strengths = ladder(cfg.pilot_start, cfg.pilot_max_strength, cfg.pilot_factor)
    return (
        f"strength auto: a pilot chooses it at the start ({len(strengths)} candidate strengths "
        f"{strengths[0]:g}-{strengths[-1]:g} and unguided, {samples_per_candidate(cfg, len(strengths))} samples "
        f"each, scored against {int(held_mask.sum())} held-out references; rule: {cfg.pilot_rule})"
    )


def run_pilot(ctx: Any) -> dict[str, Any]:
    """Run the search for a `pipeline.jobs.worker.JobContext` whose config says strength 'auto'; returns the record
    (JSON-ready): key, chosen, reason, what each rule would choose, baseline, candidates (with standard
    errors), notes, dropped constraints, which bound chose (if one did), feature space, counts, seconds, cost."""
    cfg: AugmentConfig = ctx.cfg
    bundle = ctx.bundle
    t0 = time.perf_counter()
    strengths = ladder(cfg.pilot_start, cfg.pilot_max_strength, cfg.pilot_factor)
    n = samples_per_candidate(cfg, len(strengths))
    base_record = _base_record(cfg, strengths, n)
    if cfg.guidance == "none":
        return dict(base_record, chosen=0.0, reason="guidance is none: no strength to choose", candidates=[])
    seed = pilot_seed(cfg)
    guide, held_mask, reason = split_for_pilot(bundle, cfg.pilot_holdout, seed)
    if reason is not None:
        log.warning("strength auto: %s %g", reason, FALLBACK_STRENGTH)
        return dict(base_record, chosen=FALLBACK_STRENGTH, reason=reason, candidates=[])
    space = _scoring_space(ctx, guide, held_mask, n, seed)
    found = search(
        functools.partial(_evaluate_candidate, ctx, space, n),
        strengths,
        n,
        space.held_feats,
        space.kernel,
        rule=cfg.pilot_rule,
        draws=cfg.pilot_bootstrap,
        seed=seed,
    )
    for note in found.notes:
        log.warning("strength auto: %s", note)
    for c in [found.baseline, *found.candidates]:
        log.info(
            "pilot s=%g: held-out MMD² %.4g ± %.2g%s",
            c.strength,
            c.mmd2,
            c.mmd2_se,
            "" if c.feasible else f" (infeasible: {c.violations[0]})",
        )
    return _record(cfg, base_record, found, space, n, time.perf_counter() - t0)


def _base_record(cfg: AugmentConfig, strengths: list[float], n: int) -> dict[str, Any]:
    """What every pilot record holds, run or skipped: the version and the settings."""
    return {
        "version": PILOT_VERSION,
        "requested": "auto",
        "settings": {
            "samples": n,
            "samples_setting": cfg.pilot_samples,
            "budget": cfg.pilot_budget,
            "holdout": cfg.pilot_holdout,
            "ladder": strengths,
            "rule": cfg.pilot_rule,
            "bootstrap": cfg.pilot_bootstrap,
        },
    }


@dataclass
class _ScoringSpace:
    """What every candidate is generated with and scored against: the guide part and the held-out part."""

    guide: Any  # the guide part of the references (a `reference.ReferenceBundle`)
    held_mask: torch.Tensor  # over the bundle's files: the held-out part
    guide_target: Any  # the guidance target built from the guide part
    features: FeatureExtractor  # the scoring space
    held_feats: torch.Tensor  # the held-out references' features
    ref_feats: torch.Tensor  # held-out and guide references' features (the scoring-space garbage rule)
    kernel: RBFKernel  # median bandwidth of the held-out features
    pilot_cfg: AugmentConfig  # the job's config with the pilot's seed, strength 0
    labels: torch.Tensor | None  # the classes of the pilot batch (None: unlabelled)
    k: int  # nearest neighbours for precision and coverage


def _scoring_space(ctx: Any, guide: Any, held_mask: torch.Tensor, n: int, seed: int) -> _ScoringSpace:
    """Prepare the held-out scoring space: the guide target, the feature space and the references' features."""
    from .reference import build_target

    cfg: AugmentConfig = ctx.cfg
    bundle = ctx.bundle
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
    pilot_cfg = cfg.model_copy(update={"seed": seed, "strength": 0.0})
    labels = assign_classes(pilot_cfg, ShardPlan(0, 0, n, n), ctx.proportions)
    k = max(1, min(PRDC_K, n - 1, len(held_feats) - 1))
    return _ScoringSpace(guide, held_mask, guide_target, features, held_feats, ref_feats, kernel, pilot_cfg, labels, k)


def _evaluate_candidate(ctx: Any, space: _ScoringSpace, n: int, strength: float) -> tuple[Candidate, torch.Tensor]:
    """Generate the pilot batch at one strength and score it; returns its scores and its samples' features."""
    from ..models.generation import generate

    cfg: AugmentConfig = ctx.cfg
    model = ctx.model
    labels = space.labels
    t = time.perf_counter()
    sub_cfg = replace_cfg(space.pilot_cfg, strength)
    latents = generate(
        sub_cfg,
        model,
        space.guide_target,
        float(sub_cfg.strength),
        ctx.model_labels,
        range(n),
        labels,
        prompts=ctx.prompts,
    )
    images = model.decode(latents.to(model.device), batch_size=cfg.batch_size)
    feats = extract(space.features, images)
    quality = prdc(feats, space.held_feats, k=space.k, masks=True)
    outside = nearest_reference_distance(latents, space.guide.latents) > cfg.support_radius * ctx.bundle.bandwidth
    far = torch.tensor(garbage(feats, space.ref_feats)["mask"], dtype=torch.bool)
    keep = torch.ones(n, dtype=torch.bool)
    tv = agreement = kept = None
    per_sample: dict[str, torch.Tensor] = {}
    if labels is not None and ctx.judge is not None and ctx.proportions is not None:
        judged = ctx.judge(latents, images)
        agree = judged == labels.cpu()
        if label_filter_on(cfg.label_filter, ctx.judge):  # the job keeps only what the judge agrees with
            keep, kept = agree, float(agree.double().mean())
            agreement = 1.0 if keep.any() else 0.0  # of what the job keeps
        else:
            agreement = float(agree.double().mean())
            per_sample["agree"] = agree.double()
        tv = class_tv(judged[keep], ctx.proportions) if keep.any() else 1.0
    bad = outside | far
    per_sample.update(
        kept=keep.double(),
        in_ball=quality["in_ball"].double().cpu(),
        hits=quality["hits"].double().cpu(),
        garbage=bad.double(),
        outside=outside.double().cpu(),
    )
    kept_feats = feats[keep] if keep.any() else feats[:0]
    c = Candidate(
        strength=strength,
        mmd2=math.nan,  # set by `search` from all candidates' features at once, with its standard error
        precision=_share(quality["in_ball"].cpu(), keep),
        recall=quality["recall"],
        coverage=float(quality["hits"].cpu()[keep].any(0).double().mean()) if keep.any() else 0.0,
        garbage=_share(bad, keep),
        spread=float(nearest_neighbour_distances(kept_feats).median()) if len(kept_feats) > 1 else 0.0,
        class_tv=tv,
        seconds=time.perf_counter() - t,
        agreement=agreement,
        kept=kept,
        outside=_share(outside.cpu(), keep),
        far=_share(far, keep),
    )
    c.per_sample = per_sample  # for the paired bootstrap of the constraints (not part of the record)
    log.info(
        "pilot s=%g: precision %.3f, coverage %.3f, garbage %.3f (outside %.3f, far %.3f)%s (%.1f s)",
        strength,
        c.precision,
        c.coverage,
        c.garbage,
        c.outside,
        c.far,
        "" if tv is None else f", class TV {tv:.3f}",
        c.seconds,
    )
    return c, feats


def _share(flags: torch.Tensor, keep: torch.Tensor) -> float:
    """The share of the kept samples that are flagged (0 when none is kept)."""
    return float(flags[keep].double().mean()) if keep.any() else 0.0


def _record(
    cfg: AugmentConfig, base_record: dict[str, Any], found: Search, space: _ScoringSpace, n: int, seconds: float
) -> dict[str, Any]:
    """Assemble the record of a pilot that ran, and log what it chose and what it cost."""
    generated = n * (1 + len(found.candidates))
    record = dict(
        base_record,
        chosen=found.chosen,
        reason=found.reason,
        choices=found.choices,
        feature_space=space.features.description,
        guide_references=len(space.guide.files),
        heldout_references=int(space.held_mask.sum()),
        baseline=asdict(found.baseline),
        candidates=[asdict(c) for c in found.candidates],
        notes=found.notes,
        dropped_constraints=found.dropped,
        bound_chose=found.bound_chose,
        samples_generated=generated,
        seconds=round(seconds, 3),
        job_generated=primary_count(cfg),
        cost_fraction_of_job=generated / primary_count(cfg),
    )
    log.info(
        "strength auto: chose %g (%s) from %d candidates of %d samples in %.1f s, %d samples (%.1f%% of this job's)",
        found.chosen,
        found.reason,
        len(found.candidates),
        n,
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
    "bootstrap_mmd2",
    "ladder",
    "samples_per_candidate",
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


def _pilot_cache(cfg: AugmentConfig, key: str):
    from .reference import default_cache_dir

    return pilot_cache_path(cfg.cache_dir or default_cache_dir(), key)


def cached_pilot(cfg: AugmentConfig, key: str) -> dict[str, Any] | None:
    """The pilot's record cached for `key` (same references, model and settings), or None."""
    return load_pilot(_pilot_cache(cfg, key), key)


def cache_pilot(cfg: AugmentConfig, record: dict[str, Any]) -> None:
    """Cache a pilot record (it carries its `key`) for later jobs with the same inputs."""
    save_pilot(_pilot_cache(cfg, record["key"]), record)
