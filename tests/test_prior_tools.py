"""The prior's measurement scripts (reach, side-by-side ablation, IG head cost, pilot stability) run end to end on
their --smoke settings (the other benchmarks' smokes: tests/test_benchmarks_smoke.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_prior_reach_smoke_measures_every_domain_and_writes_the_card(tmp_path: Path) -> None:
    import shutil

    import prior_reach

    from pipeline.models.shipped import SHIPPED_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL_DIR, model)
    out = tmp_path / "reach.json"
    result = prior_reach.main(
        ["--smoke", "--new", str(model), "--old", str(model), "--json", str(out), "--card", str(model)]
    )
    assert json.loads(out.read_text())["samples"] == 20
    for role in ("new", "old"):
        domains = result[role]["domains"]
        assert set(domains) == {"thick", "subset"}
        assert all(0.0 <= d["recall"] <= 1.0 and 0.0 <= d["coverage"] <= 1.0 for d in domains.values())
    # the same prior twice, same seeds: identical figures, so it is "higher" on no domain
    assert result["new"]["domains"] == result["old"]["domains"] and result["higher_recall_on"] == []
    card = json.loads((model / "metrics.json").read_text())["metrics"]["reach"]
    assert card["table"].count("\n") == 3  # header, rule, two domains


def test_ig_head_cost_times_both_calls() -> None:
    import ig_head_cost

    result = ig_head_cost.main(["--smoke"])
    assert result["with head"] > 0 and result["without head"] > 0 and result["ratio"] > 0


@pytest.mark.slow
def test_prior_ablation_smoke_trains_each_arm_from_the_same_stages(tmp_path: Path) -> None:
    import prior_ablation

    rows = prior_ablation.main(["--smoke", "--json", str(tmp_path / "ablation.json")])
    assert [r["arm"] for r in rows] == ["recipe", "uniform t"]
    assert all(r["step"] == 4 and 0.0 <= r["class_accuracy"] <= 1.0 for r in rows)
    assert rows[1]["flags"] == ["--timestep-sampling", "uniform"]


def test_pilot_stability_smoke_runs_the_pilot_per_seed_and_tables_the_choices() -> None:
    import pilot_stability

    results = pilot_stability.main(["--smoke"])
    (row,) = results
    assert [r["seed"] for r in row["runs"]] == [0, 1]
    assert all(r["chosen"] is not None and r["chosen"] >= 0 for r in row["runs"])
    assert all(set(r["choices"]) == {"lowest", "weakest", "middle", "strongest"} for r in row["runs"])
    assert row["within_factor_2"] == (row["ratio"] is not None and row["ratio"] <= 2)
    assert "| latent |" in pilot_stability.table(results)
