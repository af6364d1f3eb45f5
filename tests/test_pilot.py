"""`--strength auto`: the pilot's search and choice on constructed cases, and its record in a real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from tiny_models import save_tiny_dit, tiny_job_config, write_reference_folder

import pipeline.job
from pipeline.job import run_job
from pipeline.pilot import Candidate, choose, class_tv, class_tv_standard_error, is_feasible, search

REPO = Path(__file__).resolve().parents[1]


def _candidate(
    s: float, mmd2: float, precision=0.8, coverage=0.9, garbage=0.0, class_tv=0.05, spread=1.0, outside=None, far=None
) -> Candidate:
    return Candidate(s, mmd2, precision, 0.8, coverage, garbage, spread, class_tv, 0.0, outside=outside, far=far)


def _bowl(best: float, collapse_above: float = math.inf):
    """MMD² a parabola in log2(s) with its minimum at `best`; above `collapse_above` coverage collapses and
    MMD² keeps falling (what a collapse onto one shape looks like to MMD alone)."""
    tried = []

    def evaluate(s: float) -> Candidate:
        tried.append(s)
        if s == 0:
            return _candidate(0.0, 1.0)
        if s > collapse_above:
            return _candidate(s, 0.001, coverage=0.3)
        return _candidate(s, 0.02 + 0.01 * math.log2(s / best) ** 2)

    return evaluate, tried


def test_search_doubles_then_refines_and_picks_the_known_best():
    evaluate, tried = _bowl(best=0.02)
    found = search(evaluate, start=0.0025, max_strength=0.16, n=64)
    base, candidates = found.baseline, found.candidates
    assert tried[0] == 0.0 and tried[1:5] == [0.0025, 0.005, 0.01, 0.02]  # doubling from the start
    assert 0.04 in tried  # the first worse candidate ends the doubling
    assert 0.08 not in tried
    assert any(math.isclose(s, 0.02 / math.sqrt(2)) for s in tried)  # refinement around the best
    assert any(math.isclose(s, 0.02 * math.sqrt(2)) for s in tried)
    chosen, reason = choose(candidates, base)
    assert chosen == pytest.approx(0.02) and "feasible" in reason
    assert (found.chosen, found.reason) == (chosen, reason) and found.bound_chose is None and not found.notes


def test_a_collapse_that_mmd_calls_better_is_not_chosen():
    evaluate, _ = _bowl(best=0.08, collapse_above=0.03)
    found = search(evaluate, start=0.0025, max_strength=0.16, n=64)
    base, candidates = found.baseline, found.candidates
    collapsed = [c for c in candidates if c.strength > 0.03]
    assert collapsed and all(not c.feasible and "coverage" in c.violations[0] for c in collapsed)
    chosen, _ = choose(candidates, base)
    assert 0.0025 <= chosen <= 0.03  # the best *feasible* strength, not the lowest MMD²


def test_guidance_off_when_no_candidate_beats_unguided():
    def evaluate(s: float) -> Candidate:
        return _candidate(s, 0.5 + s)

    found = search(evaluate, start=0.01, max_strength=0.16, n=64)
    assert found.chosen == 0.0 and "guidance off" in found.reason


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


def _too_strong_above(limit: float, best: float):
    """A bowl with its minimum at `best`, every strength above `limit` breaking the class histogram."""
    tried = []

    def evaluate(s: float) -> Candidate:
        tried.append(s)
        if s == 0:
            return _candidate(0.0, 1.0, class_tv=0.1)
        return _candidate(s, 0.02 + 0.01 * math.log2(s / best) ** 2, class_tv=0.6 if s > limit else 0.1)

    return evaluate, tried


def test_an_infeasible_first_candidate_makes_the_search_halve():
    evaluate, tried = _too_strong_above(0.002, best=0.001)
    found = search(evaluate, start=0.0025, max_strength=0.16, n=64, min_strength=0.0003)
    assert tried[:4] == [0.0, 0.0025, 0.00125, 0.000625]  # halving; 0.000625 is worse: it stops there
    assert (
        0.0003 < found.chosen < 0.002
        and found.chosen == min((c for c in found.candidates if c.feasible), key=lambda c: c.mmd2).strength
    )
    assert "first candidate (0.0025) broke a constraint (class histogram" in found.notes[0]
    assert found.bound_chose is None
    # without a floor below the start (the old search) the same case turns guidance off
    evaluate, tried = _too_strong_above(0.002, best=0.001)
    assert search(evaluate, start=0.0025, max_strength=0.16, n=64).chosen == 0.0 and tried == [0.0, 0.0025]


def test_the_search_halves_no_further_than_the_floor_and_says_when_the_floor_chose():
    evaluate, tried = _too_strong_above(0.0, best=1.0)  # every strength infeasible
    found = search(evaluate, start=0.0025, max_strength=0.16, n=64, min_strength=0.0003)
    assert tried == [0.0, 0.0025, 0.00125, 0.000625, 0.0003125]
    assert found.chosen == 0.0 and "guidance off" in found.reason and "down to 0.0003" in found.notes[-1]
    evaluate, tried = _too_strong_above(1.0, best=1e-6)  # ever better towards 0: the floor chooses
    found = search(evaluate, start=0.0025, max_strength=0.16, n=64, min_strength=0.0003)
    assert min(tried[1:]) == 0.0003125 and found.chosen == 0.0003125
    assert found.bound_chose == "pilot_min_strength" and "the floor, not the data, chose it" in found.reason


def test_a_best_at_the_largest_allowed_strength_extends_the_range():
    evaluate, tried = _bowl(best=0.5)
    found = search(evaluate, start=0.0025, max_strength=0.16, n=64, hard_max_strength=1.28)
    assert found.extended and "the largest pilot_max_strength (0.16) allows" in found.notes[0]
    assert 0.32 in tried and 0.64 in tried and 1.28 in tried  # 1.28 is worse than 0.64: the data stopped it
    assert found.chosen == pytest.approx(0.64 / math.sqrt(2)) and found.bound_chose is None
    # without the extension the bound chooses, and the reason says so
    evaluate, tried = _bowl(best=0.5)
    capped = search(evaluate, start=0.0025, max_strength=0.16, n=64)
    assert max(tried) == 0.16 and capped.chosen == 0.16 and not capped.extended
    assert capped.bound_chose == "pilot_max_strength" and "the cap, not the data, chose it" in capped.reason


def test_a_best_still_at_the_hard_cap_is_the_caps_choice():
    evaluate, tried = _bowl(best=100.0)
    found = search(evaluate, start=0.0025, max_strength=0.16, n=64, hard_max_strength=1.28)
    assert max(tried) == 1.28 and found.chosen == 1.28 and found.extended
    assert found.bound_chose == "pilot_hard_max_strength"
    assert "pilot_hard_max_strength 1.28" in found.reason and "the cap, not the data" in found.reason


def test_a_garbage_rule_that_flags_most_unguided_samples_is_dropped_for_the_latent_support_one():
    meaningless = _candidate(0.0, 1.0, garbage=0.93, outside=0.02, far=0.92)
    assert is_feasible(_candidate(0.01, 0.1, garbage=0.99, outside=0.03, far=0.98), meaningless, n=64) == []
    bad = is_feasible(_candidate(0.01, 0.1, garbage=0.99, outside=0.2, far=0.98), meaningless, n=64)
    assert len(bad) == 1 and bad[0].startswith("garbage (outside the support) 0.200")
    meaningful = _candidate(0.0, 1.0, garbage=0.12, outside=0.02, far=0.1)
    bad = is_feasible(_candidate(0.01, 0.1, garbage=0.3, outside=0.02, far=0.28), meaningful, n=64)
    assert len(bad) == 1 and bad[0].startswith("garbage 0.300")

    def evaluate(s: float) -> Candidate:
        far = 0.92 if s == 0 else 0.97
        return _candidate(s, 1.0 if s == 0 else 0.5 + s, garbage=far + 0.01, outside=0.01, far=far)

    found = search(evaluate, start=0.0025, max_strength=0.16, n=64)
    assert found.dropped == ["garbage in the scoring space"] and "flags 92% of the unguided" in found.notes[0]
    assert found.chosen == 0.0025  # the scoring-space rule would have refused every candidate

    def evaluate_meaningful(s: float) -> Candidate:
        return _candidate(s, 1.0 if s == 0 else 0.5 + s, garbage=0.1, outside=0.01, far=0.09)

    assert search(evaluate_meaningful, start=0.0025, max_strength=0.16, n=64).dropped == []


def test_the_pilot_bounds_are_ordered():
    from pydantic import ValidationError

    from pipeline.config import AugmentConfig

    base = {"ref": "refs", "out": "out", "n": 1}
    with pytest.raises(ValidationError, match="pilot_min_strength .* must be <= pilot_start"):
        AugmentConfig(**base, pilot_min_strength=0.01)
    with pytest.raises(ValidationError, match="pilot_max_strength .* must be <= pilot_hard_max_strength"):
        AugmentConfig(**base, pilot_hard_max_strength=0.1)
    assert AugmentConfig(**base, pilot_hard_max_strength=0.16).pilot_hard_max_strength == 0.16


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
    assert [c["strength"] for c in pilot["candidates"]][:2] == [0.0025, 0.005]
    assert pilot["heldout_references"] == 12 and pilot["guide_references"] == 28
    assert pilot["samples_generated"] == 8 * (1 + len(pilot["candidates"]))
    assert pilot["seconds"] > 0 and 0 < pilot["cost_fraction_of_job"]
    assert "pixels" in pilot["feature_space"]
    assert pilot["settings"]["hard_max_strength"] == cfg.pilot_hard_max_strength
    assert isinstance(pilot["notes"], list) and isinstance(pilot["dropped_constraints"], list)
    assert pilot["bound_chose"] in (None, "pilot_min_strength", "pilot_hard_max_strength")
    assert all(0 <= c["outside"] <= c["garbage"] and 0 <= c["far"] <= c["garbage"] for c in pilot["candidates"])
    assert (pilot["baseline"]["far"] > 0.5) == (pilot["dropped_constraints"] == ["garbage in the scoring space"])
    assert json.loads((out / "pilot.json").read_text())["key"] == pilot["key"]
    samples = list(wds.WebDataset(str(out / "shards" / "synthetic-000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 8
    assert {(s["json"]["guidance"]["strength"], s["json"]["guidance"]["strength_requested"]) for s in samples} == {
        (pilot["chosen"], "auto")
    }
    # a resume, and a new run with the same references, model and settings, reuse the record
    monkeypatch.setattr(pipeline.job, "run_pilot", lambda ctx: pytest.fail("the pilot ran again"))
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
    from pipeline.pilot import feature_space
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
