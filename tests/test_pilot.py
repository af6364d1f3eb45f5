"""`--strength auto`: the pilot's search and choice on constructed cases, and its record in a real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from tiny_models import save_tiny_dit, tiny_job_config, write_reference_folder

import pipeline.jobs.job
from guidance import RBFKernel, mmd2
from pipeline.checks.pilot import (
    Candidate,
    bootstrap_mmd2,
    bootstrap_weights,
    choose,
    class_tv,
    class_tv_standard_error,
    is_feasible,
    ladder,
    paired_constraint_ses,
    samples_per_candidate,
    search,
)
from pipeline.jobs.job import run_job

REPO = Path(__file__).resolve().parents[1]


def _candidate(
    s: float, mmd2: float, precision=0.8, coverage=0.9, garbage=0.0, class_tv=0.05, spread=1.0, outside=None, far=None
) -> Candidate:
    return Candidate(s, mmd2, precision, 0.8, coverage, garbage, spread, class_tv, 0.0, outside=outside, far=far)


def _features(mean: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples N(mean, I): the same seed gives the same noise for every mean (common random numbers)."""
    return mean + torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


D = 4
TARGET = torch.tensor([1.5] + [0.0] * (D - 1), dtype=torch.float64)


def _held(seed: int, m: int = 40) -> torch.Tensor:
    return _features(TARGET, m, 10_000 + seed)


def _kernel() -> RBFKernel:
    return RBFKernel(math.sqrt(2 * D))  # about the median distance of N(·, I) samples in D dimensions


def _problem(mean_of, seed: int, n: int = 64, collapse_above: float = math.inf):
    """evaluate(s) -> (candidate, features): samples N(mean_of(s), I) from one seed for every s; above
    `collapse_above` the candidate's coverage collapses (infeasible). MMD² is set by `search`."""
    tried = []

    def evaluate(s: float):
        tried.append(s)
        coverage = 0.3 if s > collapse_above else 0.9
        return _candidate(s, math.nan, coverage=coverage), _features(mean_of(s), n, seed)

    return evaluate, tried


def _saturating(s: float) -> torch.Tensor:
    """The samples reach the target from s ≈ 0.16 on: MMD² is flat (equal within noise) above it."""
    return TARGET * (1 - math.exp(-s / 0.03))


def _bowl_at(best: float):
    """The samples are nearest the target at `best`, and move away fast on either side (in log2 s)."""
    return lambda s: (
        TARGET * (0.0 if s == 0 else 1.0)
        + torch.tensor([0.0, 1.2 * math.log2(s / best) if s > 0 else 3.0] + [0.0] * (D - 2), dtype=torch.float64)
    )


LADDER = ladder(0.01, 1.28, 2.0)


def test_the_ladder_is_geometric_and_includes_its_bounds():
    assert LADDER == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28])
    assert ladder(0.01, 0.05, 2.0) == pytest.approx([0.01, 0.02, 0.04])
    assert ladder(0.1, 0.1, 2.0) == [0.1]


def test_the_pilots_size_grows_with_the_job_and_stays_within_budget():
    from pipeline.config import AugmentConfig
    from pipeline.plan import primary_count

    def cfg(n: int, **kw) -> AugmentConfig:
        return AugmentConfig(ref="refs", out="out", n=n, **kw)

    assert samples_per_candidate(cfg(256), len(LADDER)) == 64  # a small job keeps a small pilot
    assert samples_per_candidate(cfg(100_000), len(LADDER)) == 512  # a large one buys less noise, up to a cap
    mid = samples_per_candidate(cfg(30_000), len(LADDER))
    assert 64 < mid < 512
    assert samples_per_candidate(cfg(256, pilot_samples=16), len(LADDER)) == 16  # given: as given
    for n in (10_000, 20_000, 100_000, 1_000_000):  # the floor: at most 10% of a job of 10,000 samples or more
        c = cfg(n)
        assert (1 + len(LADDER)) * samples_per_candidate(c, len(LADDER)) <= 0.1 * primary_count(c)


def test_the_bootstrap_with_unit_weights_is_the_unbiased_mmd2():
    held = _held(0)
    sets = [_features(TARGET * t, 50, 3) for t in (0.0, 0.5, 1.0)]
    values, replicates = bootstrap_mmd2(sets, held, _kernel(), draws=50, seed=0)
    for x, v in zip(sets, values, strict=True):
        assert float(v) == pytest.approx(float(mmd2(x, held, _kernel(), unbiased=True)), rel=1e-9, abs=1e-12)
    assert replicates.shape == (3, 50)


def test_the_bootstrap_standard_error_matches_the_spread_over_independent_draws():
    """The closed check: the spread of MMD²_u over fresh samples and fresh references, against the bootstrap
    standard error computed from one draw of each."""
    shifted = TARGET * 0.6
    values = [float(mmd2(_features(shifted, 64, 100 + r), _held(r), _kernel(), unbiased=True)) for r in range(300)]
    spread = float(torch.tensor(values).std())
    ses = []
    for r in range(20):
        _, rep = bootstrap_mmd2([_features(shifted, 64, 500 + r)], _held(50 + r), _kernel(), draws=300, seed=r)
        ses.append(float(rep.std()))
    assert 0.7 < sum(ses) / len(ses) / spread < 1.4


def test_paired_replicates_give_the_difference_of_close_candidates_a_small_standard_error():
    held = _held(1)
    a, b = _features(TARGET * 0.9, 64, 7), _features(TARGET * 0.95, 64, 7)  # same seeds: common random numbers
    _, rep = bootstrap_mmd2([a, b], held, _kernel(), draws=300, seed=0)
    assert float((rep[0] - rep[1]).std()) < 0.5 * float(rep[0].std())


def test_the_choice_does_not_flip_with_the_seed_where_candidates_are_equal_within_noise():
    """MMD² flat from s = 0.16 up, collapse above 0.4: the middle and the strongest within one standard error
    stay within x2 over the seeds, the lowest value does not (that is the noise the old pilot chose by)."""
    chosen, lowest = [], []
    for seed in range(8):
        evaluate, _ = _problem(_saturating, seed, collapse_above=0.4)
        found = search(evaluate, LADDER, 64, _held(seed), _kernel(), seed=seed)
        chosen.append(found.choices)
        lowest.append(found.choices["lowest"])
        assert found.choices["middle"] == found.chosen  # the default rule
    assert len(set(lowest)) > 1 and max(lowest) / min(lowest) >= 2
    for rule in ("middle", "strongest"):
        picks = [c[rule] for c in chosen]
        assert max(picks) / min(picks) <= 2 and max(picks) <= 0.32  # never a collapsed candidate


def test_the_middle_rule_takes_the_centre_of_the_flat_range_on_the_ladder():
    """Closed form: candidates within one SE at 0.04 .. 0.64 (ladder positions 2 .. 6): the middle is 0.16;
    with the centre's candidate infeasible, the nearer feasible one (ties: the stronger)."""

    def scored(strengths_within: list[float], infeasible: tuple[float, ...] = ()) -> list:
        out = []
        for s in LADDER:
            c = _candidate(s, 0.0 if s in strengths_within else 1.0)
            c.feasible, c.violations = s not in infeasible, ["x"] if s in infeasible else []
            out.append(c)
        return out

    base = _candidate(0.0, 5.0)
    reps = {s: torch.zeros(10) for s in [0.0, *LADDER]}  # no noise: within one SE = equal to the lowest
    assert choose(scored([0.04, 0.08, 0.16, 0.32, 0.64]), base, reps, "middle")[0] == 0.16
    assert choose(scored([0.04, 0.08, 0.16, 0.32, 0.64]), base, reps, "strongest")[0] == 0.64
    assert choose(scored([0.04, 0.08, 0.16, 0.32, 0.64], (0.16,)), base, reps, "middle")[0] == 0.32
    assert choose(scored([0.04, 0.08, 0.16, 0.32]), base, reps, "middle")[0] == 0.16  # 2 .. 5: centre 3.5
    assert choose(scored([0.08]), base, reps, "middle")[0] == 0.08


def test_a_clear_minimum_is_chosen_by_every_rule():
    for seed in range(3):
        evaluate, tried = _problem(_bowl_at(0.08), seed)
        found = search(evaluate, LADDER, 64, _held(seed), _kernel(), rule="strongest", seed=seed)
        assert tried == [0.0, *LADDER]  # every candidate scored: no early stop on a worse value
        assert found.choices == {"lowest": 0.08, "weakest": 0.08, "middle": 0.08, "strongest": 0.08}
        assert found.chosen == 0.08 and found.bound_chose is None
        best = next(c for c in found.candidates if c.strength == 0.08)
        assert best.within_se and best.gap_se == 0.0 and best.mmd2_se > 0
        assert [c.strength for c in found.candidates if c.within_se] == [0.08]


def test_a_collapse_that_mmd_calls_better_is_not_chosen_and_the_whole_ladder_is_scored():
    def mean_of(s: float) -> torch.Tensor:
        return _bowl_at(0.08)(min(s, 0.04)) if s <= 0.03 else TARGET  # past 0.03: MMD² best of all, but collapsed

    evaluate, tried = _problem(mean_of, 0, collapse_above=0.03)
    found = search(evaluate, LADDER, 64, _held(0), _kernel(), rule="strongest")
    assert tried == [0.0, *LADDER] and not found.notes  # no early stop: noise must not end the ladder
    assert all(not c.feasible and "coverage" in c.violations[0] for c in found.candidates if c.strength > 0.03)
    assert found.chosen in (0.01, 0.02)


def test_noisy_constraints_at_the_bottom_of_the_ladder_do_not_stop_it():
    """Weak guidance that breaks a constraint by noise (the observed case: garbage 5/64 against unguided's 3/64)
    must not end the ladder before any candidate was feasible."""
    tried = []

    def evaluate(s: float):
        tried.append(s)
        garbage = 0.047 if s == 0 else (0.078 if s < 0.03 else 0.03)
        return _candidate(s, math.nan, garbage=garbage), _features(_bowl_at(0.16)(s), 64, 0)

    found = search(evaluate, LADDER, 64, _held(0), _kernel())
    assert tried == [0.0, *LADDER] and found.chosen == 0.16
    assert [c.feasible for c in found.candidates[:2]] == [False, False]


def test_a_choice_at_the_top_of_the_ladder_says_the_cap_chose():
    evaluate, _ = _problem(_saturating, 0)
    found = search(evaluate, LADDER, 64, _held(0), _kernel(), rule="strongest")
    assert found.chosen == 1.28 and found.bound_chose == "pilot_max_strength"
    assert "the cap, not the data, chose it" in found.reason


def test_guidance_off_when_no_candidate_beats_unguided():
    evaluate, _ = _problem(lambda s: TARGET + (0.0 if s == 0 else 1.0 + s), 0)  # unguided on the target, guided off it
    found = search(evaluate, LADDER, 64, _held(0), _kernel())
    assert found.chosen == 0.0 and "guidance off" in found.reason
    assert set(found.choices.values()) == {0.0}


def test_constraints_name_what_they_violate():
    base = _candidate(0.0, 1.0, precision=0.8, coverage=0.9, garbage=0.0, class_tv=0.05)
    assert is_feasible(_candidate(0.01, 0.1), base, n=64) == []
    tol = math.sqrt(0.8 * 0.2 / 64)
    assert is_feasible(_candidate(0.01, 0.1, precision=0.8 - tol / 2), base, n=64) == []  # within noise
    worst = _candidate(0.01, 0.1, precision=0.6, garbage=0.05, class_tv=0.3, coverage=0.5, spread=0.2)
    bad = is_feasible(worst, base, n=64)
    assert [v.split()[0] for v in bad] == ["precision", "coverage", "spread", "class", "garbage"]
    perfect = _candidate(0.0, 1.0, precision=1.0)
    assert is_feasible(_candidate(0.01, 0.1, precision=1 - 1 / 64), perfect, n=64) == []  # one sample's worth


def test_class_tv_counts_other_classes_as_off_plan():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert class_tv(torch.tensor([0, 1, 0, 1]), p) == pytest.approx(0.0)
    assert class_tv(torch.tensor([0, 0, 0, 0]), p) == pytest.approx(0.5)
    assert class_tv(torch.tensor([-1, -1, 0, 1]), p) == pytest.approx(0.5)


def _tv_sd(p: list[float], planned: list[float], n: int, draws: int = 2000, seed: int = 0) -> float:
    """Standard deviation of `class_tv` over `draws` histograms of n samples from `p` (index 0: "other")."""
    g = torch.Generator().manual_seed(seed)
    judged = torch.multinomial(torch.tensor(p), n * draws, replacement=True, generator=g).view(draws, n) - 1
    q = torch.tensor(planned, dtype=torch.float64)
    return float(torch.tensor([class_tv(row, q) for row in judged]).std())


def test_class_tv_standard_error_bounds_the_noise_of_an_n_sample_histogram():
    for n in (16, 64, 256):
        # the worst case (sum_k s_k p_k = 0): TV^ = 0.8 - p^_0, whose standard deviation is exactly 1/(2 sqrt n)
        worst = _tv_sd([0.0, 0.5, 0.5], [0.8, 0.2], n)
        assert worst == pytest.approx(class_tv_standard_error(n), rel=0.1)
    assert class_tv_standard_error(64) == pytest.approx(0.0625)
    cases = [([0.0] + [0.1] * 10, [0.1] * 10), ([0.1, 0.3, 0.3, 0.3], [1 / 3] * 3), ([0.2, 0.7, 0.1], [0.5, 0.5])]
    for p, planned in cases:  # on the plan, with 'other' samples, off the plan
        assert _tv_sd(p, planned, 64) <= 1.05 * class_tv_standard_error(64), (p, planned)


def test_a_class_histogram_off_the_plan_by_sampling_noise_is_feasible():
    base = _candidate(0.0, 1.0, class_tv=0.109)
    assert is_feasible(_candidate(0.0025, 0.5, class_tv=0.258), base, n=64) == []  # the observed case
    limit = 0.109 + 0.1 + class_tv_standard_error(64)
    assert is_feasible(_candidate(0.0025, 0.5, class_tv=limit - 1e-6), base, n=64) == []
    bad = is_feasible(_candidate(0.0025, 0.5, class_tv=limit + 1e-6), base, n=64)
    assert len(bad) == 1 and bad[0].startswith("class histogram") and "standard error" in bad[0]
    # the tolerance is the noise of the batch: 16x the samples, a quarter of it, and the same excess is refused
    assert is_feasible(_candidate(0.0025, 0.5, class_tv=0.258), base, n=1024)[0].startswith("class histogram")


def test_a_garbage_rule_that_flags_most_unguided_samples_is_dropped_for_the_latent_support_one():
    meaningless = _candidate(0.0, 1.0, garbage=0.93, outside=0.02, far=0.92)
    assert is_feasible(_candidate(0.01, 0.1, garbage=0.99, outside=0.03, far=0.98), meaningless, n=64) == []
    bad = is_feasible(_candidate(0.01, 0.1, garbage=0.99, outside=0.2, far=0.98), meaningless, n=64)
    assert len(bad) == 1 and bad[0].startswith("garbage (outside the support) 0.200")
    meaningful = _candidate(0.0, 1.0, garbage=0.12, outside=0.02, far=0.1)
    bad = is_feasible(_candidate(0.01, 0.1, garbage=0.3, outside=0.02, far=0.28), meaningful, n=64)
    assert len(bad) == 1 and bad[0].startswith("garbage 0.300")

    def garbage_problem(far_unguided: float, far_guided: float):
        def evaluate(s: float):
            far = far_unguided if s == 0 else far_guided
            c = _candidate(s, math.nan, garbage=far + 0.01, outside=0.01, far=far)
            return c, _features(_bowl_at(0.04)(s), 64, 0)

        return evaluate

    found = search(garbage_problem(0.92, 0.97), LADDER, 64, _held(0), _kernel())
    assert found.dropped == ["garbage in the scoring space"] and "flags 92% of the unguided" in found.notes[0]
    assert found.chosen == 0.04  # the scoring-space rule would have refused every candidate
    assert search(garbage_problem(0.09, 0.09), LADDER, 64, _held(0), _kernel()).dropped == []


def test_the_pilot_bounds_are_ordered():
    from pydantic import ValidationError

    from pipeline.config import AugmentConfig

    base = {"ref": "refs", "out": "out", "n": 1}
    with pytest.raises(ValidationError, match="pilot_start .* must be <= pilot_max_strength"):
        AugmentConfig(**base, pilot_start=2.0)
    with pytest.raises(ValidationError, match="pilot_samples"):
        AugmentConfig(**base, pilot_samples=4)
    assert AugmentConfig(**base, pilot_samples="auto").pilot_samples == "auto"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pilot")
    return {
        "dit": str(save_tiny_dit(root / "dit")),
        "refs": str(write_reference_folder(root / "refs", count=40, classes=("a", "b"))),
        "cache": str(root / "cache"),
    }


def test_strength_auto_records_its_choice_in_run_json_and_resumes_from_it(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = tiny_job_config(tiny, out, n=8, shard_size=8, pilot_samples=8, pilot_max_strength=0.02)
    assert cfg.strength == "auto"
    summary = run_job(cfg)
    record = json.loads((out / "run.json").read_text())
    pilot = record["pilot"]
    assert record["config"]["strength"] == "auto"
    assert pilot["chosen"] == summary.strength == record["summary"]["strength"]
    assert pilot["baseline"]["strength"] == 0.0 and len(pilot["candidates"]) >= 2
    assert [c["strength"] for c in pilot["candidates"]] == [0.01, 0.02]  # the whole ladder
    assert pilot["heldout_references"] == 12 and pilot["guide_references"] == 28
    assert pilot["samples_generated"] == 8 * (1 + len(pilot["candidates"]))
    assert pilot["seconds"] > 0 and 0 < pilot["cost_fraction_of_job"]
    assert "pixels" in pilot["feature_space"]
    assert pilot["settings"]["ladder"] == [0.01, 0.02] and pilot["settings"]["samples"] == 8
    assert set(pilot["choices"]) == {"lowest", "weakest", "middle", "strongest"}
    assert pilot["choices"][cfg.pilot_rule] == pilot["chosen"]
    assert all(c["mmd2_se"] > 0 for c in pilot["candidates"])
    assert isinstance(pilot["notes"], list) and isinstance(pilot["dropped_constraints"], list)
    assert pilot["bound_chose"] in (None, "pilot_start", "pilot_max_strength")
    assert all(0 <= c["outside"] <= c["garbage"] and 0 <= c["far"] <= c["garbage"] for c in pilot["candidates"])
    assert (pilot["baseline"]["far"] > 0.5) == (pilot["dropped_constraints"] == ["garbage in the scoring space"])
    assert json.loads((out / "pilot.json").read_text())["key"] == pilot["key"]
    samples = list(wds.WebDataset(str(out / "shards" / "synthetic-000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 8
    assert {(s["json"]["guidance"]["strength"], s["json"]["guidance"]["strength_requested"]) for s in samples} == {
        (pilot["chosen"], "auto")
    }
    # a resume, and a new run with the same references, model and settings, reuse the record
    monkeypatch.setattr(pipeline.jobs.job, "run_pilot", lambda ctx: pytest.fail("the pilot ran again"))
    (out / "shards" / "synthetic-000000.tar.done").unlink()
    assert run_job(cfg).strength == pilot["chosen"]
    other = tiny_job_config(tiny, tmp_path / "other", n=16, shard_size=8, pilot_samples=8, pilot_max_strength=0.02)
    assert run_job(other).strength == pilot["chosen"]


def test_the_eval_report_shows_the_pilot():
    from dataclasses import asdict

    from pipeline.evaluation.report import pilot_figure, pilot_section

    base = _candidate(0.0, 0.02)
    cands = [_candidate(0.01, 0.01), _candidate(0.02, 0.005, coverage=0.2)]
    cands[1].feasible, cands[1].violations = False, ["coverage 0.2 < 0.9 x unguided 0.9"]
    pilot = {
        "chosen": 0.01,
        "reason": "lowest MMD² among 1 feasible candidate(s)",
        "baseline": asdict(base),
        "candidates": [asdict(c) for c in cands],
        "feature_space": "decoded images at 32x32 pixels",
        "samples_generated": 192,
        "seconds": 12.5,
        "cost_fraction_of_job": 0.02,
        "heldout_references": 30,
    }
    html = pilot_section(pilot)
    assert "chosen s = 0.01" in html and "coverage 0.2 &lt; 0.9" in html and html.count("<tr>") == 4
    assert pilot_figure(pilot).startswith(b"\x89PNG")
    assert pilot_section(None) == ""


def test_the_shipped_classifier_scores_the_pilot_only_where_it_reads_the_references():
    from pipeline.checks.pilot import feature_space
    from storage.references import read_references

    refs = read_references(str(REPO / "examples" / "thick_digits"), channels=1, size=(32, 32))
    digits = torch.tensor([int(refs.class_names[int(c)]) for c in refs.labels])
    assert feature_space(None, 1, 32, refs.images, digits).name == "classifier"
    assert feature_space(None, 1, 32, refs.images).name == "classifier"  # unlabelled: its confidence
    # the same pixels in a fixed random order: the intensity histogram of digits, no digit shape in it
    order = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))
    shuffled = refs.images.flatten(1)[:, order].view_as(refs.images)
    assert feature_space(None, 1, 32, shuffled, digits).name == "pixels"
    assert feature_space("some/other-model", 1, 64, refs.images, digits).name == "pixels"


def test_garbage_tolerance_is_at_least_the_baselines_standard_error():
    base = _candidate(0.0, 1.0, garbage=0.125)
    se = math.sqrt(0.125 * 0.875 / 64)  # 0.041: four samples in 64
    assert is_feasible(_candidate(0.01, 0.1, garbage=0.125 + se - 1e-6), base, n=64) == []
    assert is_feasible(_candidate(0.01, 0.1, garbage=0.125 + se + 1e-6), base, n=64)[0].startswith("garbage")
    clean = _candidate(0.0, 1.0, garbage=0.0)
    assert is_feasible(_candidate(0.01, 0.1, garbage=0.03), clean, n=64)[0].startswith("garbage")  # 2 points


def test_guidance_that_flips_labels_is_infeasible():
    base = _candidate(0.0, 1.0)
    base.agreement = 0.99
    ok, flips = _candidate(0.16, 0.1), _candidate(0.64, 0.05)
    ok.agreement, flips.agreement = 0.95, 0.80  # 0.95: within 5 points; 0.80: one label in five flipped
    assert is_feasible(ok, base, n=64) == []
    (bad,) = is_feasible(flips, base, n=64)
    assert bad.startswith("label agreement 0.800 < unguided 0.990 - 0.050")
    noisy = _candidate(0.0, 1.0)
    noisy.agreement = 0.5  # a judge that reads half the unguided samples: the tolerance is its standard error
    weaker = _candidate(0.16, 0.1)
    weaker.agreement = 0.5 - 0.9 * math.sqrt(2 * 0.25 / 64)
    assert is_feasible(weaker, noisy, n=64) == []


# ------------------------------------------------------------------ v5: what the job keeps, paired constraint errors


def test_a_masked_bootstrap_set_is_the_mmd2_of_its_kept_samples():
    gen = torch.Generator().manual_seed(3)
    x, held = torch.randn(40, 5, generator=gen), torch.randn(30, 5, generator=gen) + 0.3
    keep = torch.rand(40, generator=gen) > 0.3
    kernel = RBFKernel(2.0)
    values, _ = bootstrap_mmd2([x, x], held, kernel, draws=20, seed=0, masks=[keep.double(), None])
    expected = float(mmd2(x[keep].double(), held.double(), kernel, unbiased=True))
    assert float(values[0]) == pytest.approx(expected, rel=1e-9)
    assert float(values[1]) == pytest.approx(float(mmd2(x.double(), held.double(), kernel, unbiased=True)), rel=1e-9)


def _with_samples(c: Candidate, in_ball: torch.Tensor, n: int = 64) -> Candidate:
    c.per_sample = {
        "kept": torch.ones(n, dtype=torch.float64),
        "in_ball": in_ball.double(),
        "hits": in_ball.double()[:, None].repeat(1, 8),
        "garbage": torch.zeros(n, dtype=torch.float64),
        "outside": torch.zeros(n, dtype=torch.float64),
    }
    return c


def test_a_constraint_gap_within_its_paired_bootstrap_error_is_feasible():
    """Precision 58/64 unguided; the candidate loses 8 samples from the reference balls and gains 5 (55/64): a gap of
    4.7 points, beyond the unpaired binomial error (3.6) but within the paired bootstrap's (~5.6: 13 discordant
    samples). A one-sided loss of 8 (50/64, 12.5 points) stays beyond its paired error."""
    n = 64
    base_in = torch.ones(n, dtype=torch.bool)
    base_in[:6] = False
    cand_in = base_in.clone()
    cand_in[6:14] = False  # 8 leave
    cand_in[:5] = True  # 5 join
    assert (int(base_in.sum()), int(cand_in.sum())) == (58, 55)
    base = _with_samples(_candidate(0.0, 0.5, precision=58 / n), base_in)
    cand = _with_samples(_candidate(0.01, 0.4, precision=55 / n), cand_in)
    assert any(v.startswith("precision") for v in is_feasible(cand, base, n))  # binomial error alone: refused
    w, _ = bootstrap_weights(n, 10, draws=1000, seed=0)
    cand.constraint_se = paired_constraint_ses(cand, base, w)
    assert cand.constraint_se["precision"] == pytest.approx(math.sqrt(13) / n, rel=0.15)
    assert not any(v.startswith("precision") for v in is_feasible(cand, base, n))
    worse_in = base_in.clone()
    worse_in[6:14] = False
    worse = _with_samples(_candidate(0.02, 0.4, precision=50 / n), worse_in)
    worse.constraint_se = paired_constraint_ses(worse, base, w)
    assert any(v.startswith("precision") for v in is_feasible(worse, base, n))


def test_with_the_label_filter_on_agreement_is_of_what_the_job_keeps_and_it_may_discard_at_most_half():
    base = _candidate(0.0, 0.5)
    base.agreement, base.kept = 1.0, 0.97
    flips = _candidate(0.04, 0.4)
    flips.agreement, flips.kept = 1.0, 0.86  # 14% discarded by the filter: fine (the reserve replaces them)
    assert is_feasible(flips, base, 64) == []
    too_many = _candidate(0.08, 0.3)
    too_many.agreement, too_many.kept = 1.0, 0.4
    assert any("label filter keeps" in v for v in is_feasible(too_many, base, 64))
    unfiltered = _candidate(0.04, 0.4)
    unfiltered.agreement = 0.86  # the filter off: the agreement constraint binds, as before
    base_off = _candidate(0.0, 0.5)
    base_off.agreement = 1.0
    assert any("label agreement" in v for v in is_feasible(unfiltered, base_off, 64))


def test_label_filter_auto_is_on_for_the_shipped_classifier_judge_only():
    from pipeline.checks.fidelity import LabelJudge, label_filter_on

    classifier = LabelJudge("classifier", "shipped", True, lambda lat, img: torch.zeros(len(lat)))
    knn = LabelJudge("knn", "5-NN", False, lambda lat, img: torch.zeros(len(lat)))
    assert label_filter_on("auto", classifier) and not label_filter_on("auto", knn)
    assert label_filter_on(True, knn) and not label_filter_on(False, classifier)
    assert not label_filter_on(True, None)
