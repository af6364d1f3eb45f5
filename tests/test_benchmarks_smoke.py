"""Every script in benchmarks/ runs end to end on its `--smoke` settings, so none rots unnoticed.

One smoke test per script. Here: bench_families, bench_real_size, bench_throughput, domain_suite, methods_study,
prior_null_class_probe, render_results, utility_evidence, yardstick. In tests/test_prior_tools.py: ig_head_cost,
pilot_stability, prior_ablation, prior_reach. Each calls the script's `main([...])` with its outputs in
tmp_path and checks what it wrote or returned.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

#: Where each benchmark's smoke test is.
SMOKE_TESTS = {
    "bench_families": "test_benchmarks_smoke.py",
    "bench_real_size": "test_benchmarks_smoke.py",
    "bench_throughput": "test_benchmarks_smoke.py",
    "domain_suite": "test_benchmarks_smoke.py",
    "ig_head_cost": "test_prior_tools.py",
    "methods_study": "test_benchmarks_smoke.py",
    "pilot_stability": "test_prior_tools.py",
    "prior_ablation": "test_prior_tools.py",
    "prior_null_class_probe": "test_benchmarks_smoke.py",
    "prior_reach": "test_prior_tools.py",
    "render_results": "test_benchmarks_smoke.py",
    "utility_evidence": "test_benchmarks_smoke.py",
    "yardstick": "test_benchmarks_smoke.py",
}


def test_every_benchmark_has_a_smoke_and_exactly_one_smoke_test() -> None:
    """A new script in benchmarks/ needs a `--smoke` and a test that runs it (listed in SMOKE_TESTS)."""
    assert {p.stem for p in (REPO / "benchmarks").glob("*.py")} == set(SMOKE_TESTS)
    tests = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    for name, where in SMOKE_TESTS.items():
        assert '"--smoke"' in (REPO / "benchmarks" / f"{name}.py").read_text(), name
        call = re.compile(rf'\b{name}\.main\(\s*\[\s*"--smoke"')
        assert {f: len(call.findall(text)) for f, text in tests.items() if call.search(text)} == {where: 1}, name


def test_bench_families_smoke_times_stock_and_job_rows_for_every_family(tmp_path: Path) -> None:
    import bench_families

    out = tmp_path / "families.json"
    report = bench_families.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    table = out.with_suffix(".md").read_text()
    assert report["settings"]["networks"] == "smoke (tiny)" and report["settings"]["steps"] == 2
    assert list(report["families"]) == list(bench_families.FAMILIES)
    for family, fam in report["families"].items():
        assert fam["status"] == "ok" and fam["hub"] == bench_families.HUB[family]
        assert fam["batches"].keys() == {"1", "2"}
        for batch, b in fam["batches"].items():
            rows = b["rows"]
            assert set(rows) == {"stock", "job/none", "job/noisy"}, family
            for name, row in rows.items():
                assert row["status"] == "ok" and row["samples"] == int(batch), (family, name)
                assert row["samples_per_second"] > 0 and len(row["seconds"]) == 1, (family, name)
                assert row["network_calls"] == 2, (family, name)  # one (CFG-batched) denoiser call per step
            assert b["ratios"]["job_none_vs_stock"] > 0 and b["ratios"]["job_noisy_vs_job_none"] > 0
            assert rows["job/none"]["text_encoder_share"] == 0  # the job encodes its prompt once per job
        assert f"| {family} | {fam['resolution']} |" in table
    assert report["families"]["flux"]["cfg_scale"] == 3.5 and "one pass" in report["families"]["flux"]["note"]


@pytest.mark.slow
def test_bench_real_size_smoke_times_every_row_at_the_pilots_strength(tmp_path: Path) -> None:
    import bench_real_size

    from pipeline.checks.pilot import FALLBACK_STRENGTH

    out = tmp_path / "real_size.json"
    report = bench_real_size.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    strength = report["strength"]
    assert strength["requested"] == "auto" and report["settings"]["strength"] == "auto"  # the default
    assert strength["candidates"] == [0.01, 0.02, 0.04] and strength["samples_generated"] == 8 * 4  # + unguided
    if strength["by"] == "pilot":  # the pilot's choice, or (it turned guidance off) the fallback: never 0
        assert strength["chosen"] == strength["pilot_chose"] in strength["candidates"]
    else:
        assert (strength["by"], strength["pilot_chose"], strength["chosen"]) == ("fallback", 0.0, FALLBACK_STRENGTH)
    runs, default = report["batches"]["2"]["runs"], f"job/{report['settings']['default_guidance']}"
    assert set(runs) == {"job/none", default, "job/posterior", "stock", "stock+callback"}
    assert all(r["samples_per_second"] > 0 and r["ratio_to_unguided"] > 0 for r in runs.values())
    assert len(runs[default]["peak_memory_after_batch_mib"]) == 2  # the flat-memory check's two batches
    assert runs[default]["samples"] == 4 and runs["stock"]["samples"] == 2
    assert set(report["dit_xl2"]) == {"parameters_m", "job/none", default, "job/posterior"}
    assert report["models"]["unet_parameters_m"] < 5  # the tiny networks, not SD 1.5's 860M
    assert report["settings"]["networks"] == "smoke (tiny)"


def test_bench_real_size_auto_strength_falls_back_with_too_few_references(tmp_path: Path) -> None:
    """The CPU default of 8 references is too few for a pilot: the documented fallback, recorded as such."""
    import bench_real_size

    from pipeline.checks.pilot import FALLBACK_STRENGTH
    from pipeline.checks.reference import ReferenceBundle
    from pipeline.config import AugmentConfig

    latents = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    files = [f"ref_{i}.png" for i in range(8)]
    bundle = ReferenceBundle(latents, None, None, 1.0, "hash", "model", files)
    cfg = AugmentConfig(ref=str(tmp_path), out=str(tmp_path / "out"), n=1, model="model")
    bench = SimpleNamespace(
        args=SimpleNamespace(strength="auto"), defaults=cfg, loaded=None, bundle=bundle, device=torch.device("cpu")
    )
    got = bench_real_size.Bench.resolve_strength(bench)
    assert (got["requested"], got["chosen"], got["by"]) == ("auto", FALLBACK_STRENGTH, "fallback")
    assert "too few references" in got["reason"]
    bench.args.strength = 0.02
    assert bench_real_size.Bench.resolve_strength(bench)["by"] == "given"


@pytest.mark.slow
def test_bench_throughput_smoke_times_every_mode_and_a_job(tmp_path: Path) -> None:
    import bench_throughput

    out = tmp_path / "throughput.json"
    report = bench_throughput.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["modes"].keys() == report["modes"].keys()
    assert set(report["modes"]) == {"none", "latent", "noisy", "posterior", "lookahead2"}
    assert report["modes"]["none"]["throughput_vs_none"] == 1.0
    assert all(m["samples_per_second"] > 0 and len(m["seconds"]) == 1 for m in report["modes"].values())
    assert set(report["alignment"]) == {f"mmd2_heldout_{m}" for m in ("none", "latent", "noisy")}
    assert report["job"]["n_kept"] == 8 and 0 < report["job"]["network_share"] <= 1
    assert report["settings"]["strength"] == 0.01  # `auto`'s fixed fallback: the job's own cost, no pilot


@pytest.mark.slow
def test_domain_suite_smoke_runs_the_decision_suite_into_out(tmp_path: Path) -> None:
    import domain_suite

    domain_suite.main(["--smoke", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "decision.json").read_text())
    assert list(results["domains"]) == ["thick"] and results["failures"] == []
    runs = results["domains"]["thick"]["runs"]
    for variant in ("labelled", "unlabelled"):
        (m,) = runs[variant][domain_suite.SMOKE_ARM].values()
        assert m["strength"] in (0.0, 0.01, 0.02, 0.04)  # the pilot's choice on its short ladder (0: off)
        assert m["mmd2"] == m["mmd2"] and 0.0 <= m["garbage"] <= 1.0
    assert results["settings"]["n"] == 8 and results["settings"]["utility_keys"] == ["mix"]
    section = (tmp_path / "decision.md").read_text().strip()
    assert section.startswith(domain_suite.DEC_START) and section in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results" / "decision" / "thick-labelled.png").stat().st_size > 0


@pytest.mark.slow
def test_yardstick_smoke_runs_anchors_arms_curve_and_the_reach_refusal(tmp_path: Path) -> None:
    import yardstick

    report = yardstick.main(["--smoke", "--out", str(tmp_path), "--extra-arms", "unlabelled/s0.02:strength=0.02"])
    by_domain = {r["domain"]: r for r in report["results"]}
    assert list(by_domain) == ["noise", "fonts", "inverted"]
    for name in ("noise", "fonts"):
        anchors = by_domain[name]["anchors"]
        assert {"refs", "refs_aug", "oracle", "refs_2x", "refs_aug_2x", "usable", "overfits"} <= set(anchors)
        default = by_domain[name]["labelled"]["labelled/default/seed0"]
        assert set(default["downstream"]) == set(yardstick.DEFAULT_ARM_RECIPES)
        assert all({"vs_refs", "vs_aug", "gap_closed"} <= set(d) for d in default["downstream"].values())
        assert 0.0 <= default["garbage"] <= default["off_domain"] <= 1.0 and default["mmd2"] == default["mmd2"]
        assert 0.0 <= default["class_deviation"] <= 1.0
    assert by_domain["fonts"]["unlabelled"]["unlabelled/s0.02/seed0"]["strength"] == 0.02  # the extra arm
    assert set(by_domain["fonts"]["curve"]["points"]) == {"4", "8"}
    assert "reach" in by_domain["inverted"]
    text = (tmp_path / "results.md").read_text()
    assert "The judge's anchors" in text and "Size curve" in text and "off-domain" in text
    assert (tmp_path / "grids-png" / "fonts.png").stat().st_size > 0
    # --rescore recomputes the set scores from the run folders and keeps the trained numbers
    again = yardstick.main(["--out", str(tmp_path), "--cached-only", "--rescore", "--smoke"])
    rescored = {r["domain"]: r for r in again["results"]}["fonts"]["labelled"]["labelled/default/seed0"]
    before = by_domain["fonts"]["labelled"]["labelled/default/seed0"]
    assert rescored["downstream"] == before["downstream"] and rescored["mmd2"] == pytest.approx(before["mmd2"])


@pytest.mark.slow
def test_methods_study_smoke_writes_each_studys_rows(tmp_path: Path) -> None:
    import methods_study

    records = methods_study.main(["--smoke", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["kernels.json", "rff.json", "strength.json"]
    strength = json.loads((tmp_path / "strength.json").read_text())
    assert strength == json.loads(json.dumps(records["strength"]))
    assert {(r["domain"], r["setting"]) for r in strength["rows"]} == {
        (d, s) for d in ("thick", "slanted") for s in ("none (conditional prior)", "latent s=0.01")
    }
    assert all(r["calls"] > 0 and 0.0 <= r["class_acc"] <= 1.0 and "mmd2_std" in r for r in strength["rows"])
    assert [r["setting"] for r in records["kernels"]["rows"]] == [
        f"{k} s=0.01" for k in ("rbf", "rbf-multi", "cubic", "rff")
    ]
    assert [r["references"] for r in records["rff"]["rows"]] == [100, 400]


@pytest.mark.slow
def test_prior_null_class_probe_smoke_probes_the_prior_and_trains_it_further(tmp_path: Path) -> None:
    import prior_null_class_probe

    out = tmp_path / "probe.json"
    rows = prior_null_class_probe.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["setting"] for r in rows] == [
        "real held-out",
        "VAE reconstructions of held-out",
        "shipped, null class, 2 DDIM steps eta 1",
        "shipped, null class, 4 DDIM steps eta 1",
        "shipped, conditional no CFG",
        "+2 steps at label dropout 0.3, null class",
        "+2 steps at label dropout 0.3, conditional no CFG",
    ]
    assert all(0.0 <= r["confident_fraction"] <= 1.0 for r in rows)
    assert 0.0 <= rows[-1]["class_accuracy"] <= 1.0


@pytest.mark.slow
def test_render_results_smoke_renders_the_methods_studys_smoke() -> None:
    import render_results

    text = render_results.main(["--smoke"])
    assert [line for line in text.splitlines() if line.startswith("### ")] == ["### rff", "### strength"]
    assert "`python benchmarks/methods_study.py --study strength --n 8 --seeds 2 --steps 2 --eta 1 " in text
    assert "--strengths 0.01`" in text and "| thick | latent s=0.01 |" in text
    assert "| references | RBF MMD² |" in text and "| 400 |" in text


@pytest.mark.slow
def test_utility_evidence_smoke_makes_the_data_runs_and_the_four_arms(tmp_path: Path) -> None:
    import utility_evidence

    results = utility_evidence.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "utility_evidence.json").read_text()) == results
    (r,) = results
    assert r["domain"] == "thick" and r["settings"]["n_synthetic"] == 8
    assert set(r["arms"]) == {"a_real", "b_real_plus_synthetic", "c_synthetic", "d_real_plus_unguided"}
    assert all(0.0 <= a["accuracy_mean"] <= 1.0 for a in r["arms"].values())
    assert (tmp_path / "thick-guided" / "run.json").is_file() and (tmp_path / "thick-unguided" / "run.json").is_file()
    assert "| thick | 8 |" in utility_evidence.render(results)
