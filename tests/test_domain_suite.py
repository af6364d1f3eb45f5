"""The domain suite's pieces: domain splits, garbage and class-histogram metrics, the results section."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluation.domains import DOMAINS, make_domain
from pipeline.measures.metrics import class_histogram, garbage

REPO = Path(__file__).resolve().parents[1]


def _digits(n_per_class: int = 100):
    """Synthetic 28×28 'digits' (a bar whose position encodes the class), rows 0..N-1."""
    images, labels = [], []
    for c in range(10):
        for _ in range(n_per_class):
            img = np.zeros((28, 28), dtype=np.uint8)
            img[6:22, 2 + 2 * c : 5 + 2 * c] = 255
            images.append(img)
            labels.append(c)
    return np.stack(images), np.asarray(labels)


@pytest.mark.parametrize("name", list(DOMAINS))
def test_every_domain_splits_disjointly_and_deterministically(name):
    images, labels = _digits()
    rows = np.arange(len(labels))[::2]  # a "held-out" subset of the rows
    spec = DOMAINS[name]
    d = make_domain(spec, images, labels, rows)
    assert set(d.ref_rows).isdisjoint(d.test_rows) and set(d.ref_rows) | set(d.test_rows) <= set(rows)
    assert {c: int((d.ref_labels == c).sum()) for c in spec.references} == spec.references
    assert set(d.test_labels) == set(spec.references)  # every other row of the domain's classes is a test image
    assert len(d.test_rows) == sum(int((labels[rows] == c).sum()) - k for c, k in spec.references.items())
    assert d.ref_images.shape == (len(d.ref_rows), 32, 32) and d.ref_images.dtype == np.uint8
    again = make_domain(spec, images, labels, rows)
    assert np.array_equal(again.ref_images, d.ref_images) and np.array_equal(again.test_images, d.test_images)


def test_shifts_do_what_they_say():
    images, labels = _digits(1)
    plain = DOMAINS["subset"].shift(images, np.random.default_rng(0)).astype(float)
    rng = np.random.default_rng(0)
    ink = lambda x: float((x > 127).mean())  # noqa: E731
    assert ink(DOMAINS["thick"].shift(images, rng)) > 1.5 * ink(plain)
    assert ink(DOMAINS["thin"].shift(images, rng)) < 0.8 * ink(plain)
    grey = DOMAINS["contrast"].shift(images, rng)
    assert abs(int(grey.min()) - 0.3 * 255) <= 1 and abs(int(grey.max()) - 0.7 * 255) <= 1  # 0.3 + 0.4 v
    assert ink(DOMAINS["scale"].shift(images, rng)) < 0.6 * ink(plain)
    noisy = DOMAINS["noise"].shift(images, rng).astype(float)
    assert 0.1 * 255 < np.std(noisy - plain) < 0.25 * 255


def test_garbage_counts_only_samples_far_from_every_real_image():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    near = real[:10] + 0.01
    far = torch.full((3, 4), 50.0, dtype=torch.float64)
    out = garbage(torch.cat([near, far]), real)
    assert out["count"] == 3 and out["mask"] == [False] * 10 + [True] * 3
    assert garbage(real, real)["rate"] == 0.0  # real data is never garbage by construction


def test_class_histogram_deviation_in_shares():
    planned = [0.5, 0.25, 0.25]
    exact = class_histogram(torch.tensor([0, 0, 1, 2]), planned)
    assert exact["counts"] == [2, 1, 1] and exact["max_deviation"] == 0.0
    off = class_histogram(torch.tensor([0, 0, 0, -1]), planned)
    assert off["other"] == 1 and off["max_deviation"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("domain_suite", REPO / "benchmarks" / "domain_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["domain_suite"] = module
    spec.loader.exec_module(module)
    return module


def test_arms_parse(suite):
    assert suite.arm_settings("default") == {}
    assert suite.arm_settings("unguided") == {"guidance": "none"}
    assert suite.arm_settings("noisy@auto") == {"guidance": "noisy", "strength": "auto"}
    assert suite.arm_settings("latent@0.02") == {"guidance": "latent", "strength": 0.02}
    assert suite.arm_settings("default,cfg_scale=2,label_filter=true") == {"cfg_scale": 2, "label_filter": True}
    with pytest.raises(SystemExit):
        suite.arm_settings("latent")


def test_results_section_is_replaced_between_markers(suite, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n")
    suite.write_section(doc, f"{suite.START}\nfirst\n{suite.END}")
    suite.write_section(doc, f"{suite.START}\nsecond\n{suite.END}")
    text = doc.read_text()
    assert text.count("## 5. Domain suite") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n\nintro\n")


def test_decision_section_keeps_the_domain_suite_section(suite, tmp_path):
    doc = tmp_path / "results.md"
    suite.write_section(doc, f"{suite.START}\nold suite\n{suite.END}")
    for text in ("first", "second"):
        suite.write_section(
            doc, f"{suite.DEC_START}\n{text}\n{suite.DEC_END}", suite.DEC_START, suite.DEC_END, "## 6. X"
        )
    text = doc.read_text()
    assert "old suite" in text and "second" in text and "first" not in text and text.count("## 6. X") == 1


# --------------------------------------------------------------------------------------------------------
# The decision suite (issue 24 item 3)
# --------------------------------------------------------------------------------------------------------


def test_decision_defaults_and_overrides(suite):
    args = suite.parse_args(["--decision"])
    assert args.domains == ["thick", "thin", "slant", "lowres", "elastic", "noise"]
    assert (args.n, args.gen_seeds, args.train_seeds, args.utility_steps, args.steps) == (200, 2, 3, 300, None)
    assert args.labelled_arms == suite.DECISION_LABELLED and args.unlabelled_arms == suite.DECISION_UNLABELLED
    assert args.utility_arms == suite.DECISION_LABELLED and args.out.name == "decision"
    assert (args.recipes, args.affine_recipes) == (["mix", "balanced", "finetune"], ["balanced"])
    for variant, arms in (("labelled", suite.DECISION_LABELLED), ("unlabelled", suite.DECISION_UNLABELLED)):
        assert suite.BASELINE_ARM[variant] in arms
        for arm in arms:
            suite.arm_settings(arm)  # every default arm parses
    assert suite.arm_settings("unguided,pseudo_classes=false") == {"guidance": "none", "pseudo_classes": False}
    mine = suite.parse_args(["--decision", "--n", "16", "--steps", "20", "--unlabelled-arms", "--domains", "noise"])
    assert (mine.n, mine.steps, mine.unlabelled_arms, mine.domains) == (16, 20, [], ["noise"])
    plain = suite.parse_args([])  # the domain suite keeps its defaults
    assert (plain.n, plain.utility_steps, plain.domains, plain.out.name) == (1000, 600, list(DOMAINS), "suite")


def test_decision_plan_and_cache_keys(suite, tmp_path):
    plan = suite.decision_plan(["thick", "noise"], ["default", "unguided"], ["default"], gen_seeds=2)
    assert len(plan) == 2 * (2 + 1) * 2
    assert plan[0] == suite.RunKey("thick", "labelled", "default", 0) and plan[-1].domain == "noise"
    paths = {suite.cache_path(tmp_path, k) for k in plan}
    assert len(paths) == len(plan)  # one file per (domain, variant, arm, seed)
    key = suite.RunKey("thick", "unlabelled", "noisy@auto,pseudo_classes=true,cfg_scale=2", 1)
    assert suite.cache_path(tmp_path, key) == (
        tmp_path / "metrics/thick/unlabelled/noisy-auto-pseudo_classes-true-cfg_scale-2/seed1.json"
    )
    assert suite.utility_keys(["mix", "finetune"], ["balanced"]) == ["mix", "finetune", "balanced+affine"]
    arms = suite.decision_plan(["thick"], ["default", suite.BASELINE_ARM["labelled"], "x"], [], gen_seeds=1)
    assert [k.arm for k in arms] == [suite.BASELINE_ARM["labelled"], "default", "x"]  # the ratios' baseline first


def test_trainings_resume_from_the_cache(suite):
    entry: dict = {}
    keys = ["mix", "balanced+affine"]
    assert suite.pending_trainings(entry, keys, 2, 300) == [
        ("mix", 0),
        ("mix", 1),
        ("balanced+affine", 0),
        ("balanced+affine", 1),
    ]
    suite.record_training(entry, "mix", 0, 300, 0.5)
    suite.record_training(entry, "mix", 1, 300, 0.7)
    assert suite.pending_trainings(entry, keys, 2, 300) == [("balanced+affine", 0), ("balanced+affine", 1)]
    assert suite.mean_accuracy(entry["mix"], 2, 300) == pytest.approx(0.6)
    assert suite.mean_accuracy(entry["mix"], 3, 300) is None  # a missing seed: no mean yet
    assert suite.pending_trainings(entry, ["mix"], 2, 600) == [("mix", 0), ("mix", 1)]  # other steps: redo
    suite.record_training(entry, "mix", 0, 600, 0.9)
    assert entry["mix"] == {"steps": 600, "by_seed": {"0": 0.9}}


def test_flat_references_are_the_same_images_once(suite, tmp_path):
    from PIL import Image

    for c in ("3", "7"):
        (tmp_path / "refs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32), int(c) * 10, np.uint8), mode="L").save(
                tmp_path / "refs" / c / f"mnist{c}{i}.png"
            )
    flat = suite.prepare_flat(tmp_path)
    names = sorted(p.name for p in flat.iterdir())
    assert names == ["mnist30.png", "mnist31.png", "mnist70.png", "mnist71.png"] and not any(
        p.is_dir() for p in flat.iterdir()
    )
    assert (flat / "mnist70.png").read_bytes() == (tmp_path / "refs/7/mnist70.png").read_bytes()
    (flat / "mnist30.png").unlink()
    suite.prepare_flat(tmp_path)  # written once (the marker), not again
    assert not (flat / "mnist30.png").exists()


def test_class_share_ratio_and_pilot_stability(suite):
    refs = torch.tensor([0] * 5 + [1] * 5)  # half zeros, half ones as the classifier reads them
    out = suite.class_share_ratio(torch.tensor([0] * 15 + [1] * 5), refs, num_classes=3)
    assert out["ratios"][:2] == pytest.approx([1.5, 0.5]) and out["max_ratio"] == pytest.approx(1.5)
    assert out["worst_class"] == 0
    unseen = suite.class_share_ratio(torch.tensor([2, 0, 0, 1]), refs, num_classes=3)
    assert unseen["worst_class"] == 2 and unseen["max_ratio"] == pytest.approx(0.25 / 0.05)  # half a reference
    assert suite.pilot_stable([0.01, 0.02]) is True and suite.pilot_stable([0.01, 0.03]) is False
    assert suite.pilot_stable([0.01]) is None and suite.pilot_stable([0.01, None]) is None
    assert suite.pilot_stable([0.0, 0.0]) is True and suite.pilot_stable([0.0, 0.01]) is False


def _metrics(mmd2, garbage=0.0, share=1.0, labels=None, pilot=None, downstream=None):
    m = {
        "strength": pilot,
        "mmd2": mmd2,
        "kid": 0.01,
        "precision": 0.9,
        "recall": 0.8,
        "coverage": 0.7,
        "garbage": garbage,
        "class_share": {"max_ratio": share},
        "pilot": None if pilot is None else {"chosen": pilot, "seconds": 10.0, "cost_fraction_of_job": 0.5},
        "run_seconds": 100.0,
        "downstream": downstream or {},
    }
    if labels is not None:
        m["label_agreement"] = labels
    return m


def _constructed_results():
    """Two domains, two gen seeds. Labelled: `default` (pilot), baseline `unguided,cfg_scale=2`; unlabelled:
    `default` (pilot), baseline `unguided,pseudo_classes=false`. Baselines of the CNN: 0.80 alone, 0.85 affine."""
    lab_base, unl_base = "unguided,cfg_scale=2,label_filter=true", "unguided,pseudo_classes=false"
    domains = {}
    for name, (ratio, rate, share, s1, acc) in {
        "thick": (0.1, 0.0, 1.2, 0.02, 0.82),  # meets everything
        "noise": (0.2, 0.02, 1.6, 0.05, 0.79),  # MMD² 0.2x, garbage 2%, class 1.6x, pilot 0.01 -> 0.05, -1 pt
    }.items():
        lab = {
            "default": {
                "0": _metrics(0.1, labels=0.99, pilot=0.01, downstream={"mix": acc, "balanced+affine": 0.86}),
                "1": _metrics(0.1, labels=0.99, pilot=s1, downstream={"mix": acc, "balanced+affine": 0.86}),
            },
            lab_base: {s: _metrics(1.0, labels=0.97, downstream={"mix": 0.80, "balanced+affine": 0.85}) for s in "01"},
        }
        unl = {
            "default": {s: _metrics(ratio, rate, share, pilot=0.01) for s in "01"},
            unl_base: {s: _metrics(1.0) for s in "01"},
        }
        domains[name] = {
            "shift": name,
            "references": 100,
            "test_images": 900,
            "classifier_on_test": 0.9,
            "classifier_on_references": 0.95,
            "baselines": {"real": 0.80, "real+affine": 0.85},
            "runs": {"labelled": lab, "unlabelled": unl},
        }
    settings = {
        "n": 200,
        "steps": None,
        "gen_seeds": 2,
        "train_seeds": 3,
        "utility_steps": 300,
        "utility_keys": ["mix", "balanced+affine"],
        "labelled_arms": ["default", lab_base],
        "unlabelled_arms": ["default", unl_base],
    }
    return {"settings": settings, "domains": domains, "failures": []}


def test_decision_summary_and_floors_known_answers(suite):
    results = _constructed_results()
    s = suite.arm_summary(results, "unlabelled", "default")
    assert s["mmd_ratio_mean"] == pytest.approx(0.15) and s["mmd_ratio_max"] == pytest.approx(0.2)
    assert s["garbage_max"] == pytest.approx(0.02) and s["class_share_max"] == pytest.approx(1.6)
    assert s["pilot_stable"] is True and s["pilot_by_seed"] == [0.01, 0.01]
    assert s["pilot_time_fraction"] == pytest.approx(0.1) and s["pilot_sample_fraction"] == pytest.approx(0.5)
    floors = suite.arm_floors(s, "unlabelled")
    assert list(floors.values()) == [False, False, False, True] and suite.floors_met(floors) is False
    lab = suite.arm_summary(results, "labelled", "default")
    assert lab["label_agreement_min"] == pytest.approx(0.99) and lab["pilot_stable"] is False  # 0.01 -> 0.05 on noise
    mix = lab["downstream"]["mix"]
    assert mix["real"]["mean"] == pytest.approx(0.5) and mix["real"]["min"] == pytest.approx(-1.0)  # +2, -1 points
    assert mix["real+affine"]["mean"] == pytest.approx(-4.5)
    assert lab["downstream"]["balanced+affine"]["real+affine"]["mean"] == pytest.approx(1.0)
    checks = suite.arm_floors(lab, "labelled")
    assert checks == {
        "labels >= 0.98": True,
        "downstream balanced+affine": True,  # +1 point vs references + affine on both domains
        "downstream mix": True,  # mean +0.5 >= 0 and worst -1.0 >= -1
        "pilot within 2x": False,
    }
    base = suite.arm_floors(
        suite.arm_summary(results, "labelled", "unguided,cfg_scale=2,label_filter=true"), "labelled"
    )
    assert base["labels >= 0.98"] is False and base["pilot within 2x"] is None
    assert base["downstream mix"] is True and base["downstream balanced+affine"] is True  # zero change
    assert suite.floors_met({"a": True, "downstream x": False, "downstream y": True}) is True
    assert suite.floors_met({"a": None, "downstream x": None}) is None


def test_decision_table_renders(suite):
    text = suite.render_decision(_constructed_results(), "python benchmarks/domain_suite.py --decision", 7200, "img")
    assert text.startswith(suite.DEC_START) and text.endswith(suite.DEC_END)
    row = next(line for line in text.splitlines() if line.startswith("| unlabelled | `default` |"))
    assert "| 0.150 | 0.200 | 1.0% | 2.0% | 1.60 |" in row and "0.01 / 0.01 | ✓ | 10% / 50%" in row
    lab = next(line for line in text.splitlines() if line.startswith("| `default` | +0.5 (-1.0)"))
    assert "+1.0 (+1.0)" in lab  # balanced+affine vs real+affine
    assert "| **`default`** | ✗ | ✗ | ✗ | ✓ | ✗ |" in text  # the unlabelled default's floors
    assert "| noise | unlabelled | `default` | 0.01 / 0.01 |" in text  # per-domain table
    assert "![thick labelled](img/thick-labelled.png)" in text


def test_decision_run_resumes_from_its_cache(suite, tmp_path, monkeypatch):
    """Every run and training is made once: an interrupted suite resumes where it stopped, a finished one
    reruns nothing (the runs and trainings are stubbed; the bookkeeping is real)."""
    calls = {"runs": [], "trainings": [], "baselines": 0}
    classes = [str(c) for c in range(10)]
    refs = suite.LabelledImages(torch.zeros(10, 1, 32, 32), torch.arange(10), classes)

    def prepare_data(out, names):
        folders = {}
        for name in names:
            (out / "data" / name / "refs" / "0").mkdir(parents=True, exist_ok=True)
            folders[name] = out / "data" / name
        return folders, torch.zeros(2, 1, 32, 32)

    def load_domain(name, root, plain, clf):
        info = {
            "shift": name,
            "references": 10,
            "test_images": 10,
            "classifier_on_test": 1.0,
            "classifier_on_references": 1.0,
        }
        return suite.DomainData(name, root, refs, refs, None, None, None, None, torch.arange(10), info)

    def decision_run(key, d, args, clf):
        calls["runs"].append(key)
        m = _metrics(
            0.5 if key.arm == "default" else 1.0, labels=1.0 if key.variant == "labelled" else None, pilot=0.01
        )
        return {k: v for k, v in m.items() if k != "downstream"}, refs.images, refs.labels

    def train_key(key, refs_, syn, test, seed, steps, width=32):
        if len(calls["trainings"]) == limit[0]:
            raise KeyboardInterrupt
        calls["trainings"].append((key, seed))
        return 0.9

    def baselines(d, args):
        calls["baselines"] += 1
        return {"real": 0.8, "real+affine": 0.85}

    monkeypatch.setattr(suite, "prepare_data", prepare_data)
    monkeypatch.setattr(suite, "load_domain", load_domain)
    monkeypatch.setattr(suite, "load_shipped_classifier", lambda: None)
    monkeypatch.setattr(suite, "decision_run", decision_run)
    monkeypatch.setattr(suite, "train_key", train_key)
    monkeypatch.setattr(suite, "domain_baselines", baselines)
    monkeypatch.setattr(suite, "_run_images", lambda key, d, args, clf: (refs.images, refs.labels))
    monkeypatch.setattr(suite, "grids_figure", lambda panels, **kw: b"png")
    argv = [
        *("--decision", "--domains", "thick", "--gen-seeds", "2", "--train-seeds", "2"),
        *("--out", str(tmp_path / "out"), "--results", str(tmp_path / "results.md")),
        *("--labelled-arms", "default", "unguided,cfg_scale=2,label_filter=true"),
        *("--unlabelled-arms", "default", "unguided,pseudo_classes=false", "--recipes", "mix", "--affine-recipes"),
    ]
    limit = [3]  # interrupted after 3 trainings (of 2 labelled arms x 2 gen seeds x 1 recipe x 2 train seeds = 8)
    with pytest.raises(KeyboardInterrupt):
        suite.main(argv)
    assert len(calls["runs"]) == 2 and len(calls["trainings"]) == 3  # the second run's second training stopped it
    limit[0] = -1
    suite.main(argv)
    assert len(calls["runs"]) == 8 and len(set(calls["runs"])) == 8  # 2 variants x 2 arms x 2 seeds, each once
    assert len(calls["trainings"]) == 8
    text = (tmp_path / "out" / "decision.md").read_text()
    assert "| labelled | `default` | 0.500 | 0.500 |" in text and "+10.0 (+10.0)" in text
    assert (tmp_path / "out" / "decision.md").read_text().strip() in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results" / "decision" / "thick-unlabelled.png").read_bytes() == b"png"
    suite.main(argv)  # finished: nothing is made again
    assert len(calls["runs"]) == 8 and len(calls["trainings"]) == 8
    cached = json.loads(suite.cache_path(tmp_path / "out", calls["runs"][0]).read_text())
    assert cached["settings"]["n"] == 200 and cached["utility"]["mix"]["by_seed"] == {"0": 0.9, "1": 0.9}
    with pytest.raises(SystemExit, match="another --out"):
        suite.main([*argv, "--n", "50"])  # the cache was made with other settings


def test_arms_the_config_rejects_stop_the_suite_before_any_work(suite, tmp_path):
    args = suite.parse_args(["--decision", "--out", str(tmp_path), "--unlabelled-arms", "default,no_such_field=1"])
    with pytest.raises(SystemExit, match="no_such_field"):
        suite.check_arms(args, tmp_path)
    suite.check_arms(suite.parse_args(["--decision", "--out", str(tmp_path)]), tmp_path)  # the defaults pass
