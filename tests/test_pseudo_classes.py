"""Issue 24, item 2: unlabelled references on a class-conditional model get pseudo-classes.

On the shipped prior the shipped digit classifier reads unlabelled digit references, each gets the digit it
reads and the run samples class-conditionally in those proportions; the output stays unlabelled unless
--pseudo-labels. Off, without a judge (other models) or on references the classifier cannot read, the run
samples the null class and run.json says why."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from tiny_models import save_tiny_dit, tiny_job_config, write_reference_folder
from typer.testing import CliRunner

import pipeline.jobs.job
import pipeline.models.generation
from flows.cli import app
from pipeline.checks.pseudo import assign_pseudo_classes
from pipeline.checks.reference import prepare_reference
from pipeline.config import AugmentConfig
from pipeline.jobs.job import build_context, run_job
from pipeline.models.loading import load_model
from pipeline.plan import class_quotas

REPO = Path(__file__).resolve().parent.parent
THICK_DIGITS = REPO / "examples" / "thick_digits"  # class folders 0, 1, 3, 7 (24 each)

#: A small, fast job on the shipped prior: fixed strength (no pilot), no reach check, 2 steps.
FAST = {"steps": 2, "strength": 0.05, "reach_check": False, "progress": "quiet", "batch_size": 16}


def true_digit(file: str) -> int:
    return int(Path(file).name.split("_")[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The example digits without their class folders (the digit kept in the file name), the same images
    with their pixels in a fixed random order (no digit shape left), and a bundle cache."""
    root = tmp_path_factory.mktemp("pseudo")
    flat, shuffled = root / "digits", root / "shuffled"
    flat.mkdir()
    shuffled.mkdir()
    order = np.random.default_rng(0).permutation(32 * 32)
    for path in sorted(THICK_DIGITS.glob("*/*.png")):
        name = f"{path.parent.name}_{path.name}"
        shutil.copy(path, flat / name)
        pixels = np.asarray(Image.open(path).convert("L").resize((32, 32)))
        Image.fromarray(pixels.reshape(-1)[order].reshape(32, 32)).save(shuffled / name)
    return {"digits": str(flat), "shuffled": str(shuffled), "cache": str(root / "cache"), "root": root}


@pytest.fixture(scope="module")
def shipped():
    return load_model(None, "cpu")


def shipped_config(data, out: Path, **overrides) -> AugmentConfig:
    return AugmentConfig(
        **{"ref": data["digits"], "n": 8, "out": str(out), "cache_dir": data["cache"], **FAST, **overrides}
    )


def test_a_model_without_classes_or_labelled_references_are_left_alone():
    bundle = SimpleNamespace(labels=None)
    cfg = AugmentConfig(ref="r", out="o", n=1)
    assert assign_pseudo_classes(bundle, SimpleNamespace(num_classes=None), cfg) == (bundle, None)
    labelled = SimpleNamespace(labels=torch.zeros(3, dtype=torch.long))
    assert assign_pseudo_classes(labelled, SimpleNamespace(num_classes=10), cfg) == (labelled, None)


@pytest.mark.slow
def test_the_shipped_classifier_gives_unlabelled_digits_their_digits(data, shipped, tmp_path):
    cfg = shipped_config(data, tmp_path / "out")
    encoded = prepare_reference(cfg, shipped)
    assert encoded.labels is None
    bundle, record = assign_pseudo_classes(encoded, shipped, cfg)
    assert bundle.pseudo_labels and bundle.pseudo_classes == record and record["used"] is True
    assert record["judge"] == "the shipped digit classifier" and record["mean_confidence"] >= 0.8
    assert bundle.class_names == record["class_names"] == sorted(bundle.class_names, key=int)
    read = [int(bundle.class_names[int(c)]) for c in bundle.labels]
    truth = [true_digit(f) for f in bundle.files]
    assert np.mean(np.equal(read, truth)) >= 0.9
    assert record["counts"] == {name: read.count(int(name)) for name in bundle.class_names}
    assert sum(record["counts"].values()) == len(bundle.files)
    # the pseudo labels are not cached: the next run reuses the bundle unlabelled and reads them again
    again = prepare_reference(cfg, shipped)
    assert again.reused and again.labels is None and not again.pseudo_labels


@pytest.mark.slow
def test_a_pseudo_class_run_samples_class_conditionally_and_its_output_stays_unlabelled(
    data, shipped, tmp_path, monkeypatch
):
    conditions = []
    sample_latents = pipeline.models.generation.sample_latents

    def recording(*args, condition=None, **kwargs):
        conditions.append(condition)
        return sample_latents(*args, condition=condition, **kwargs)

    monkeypatch.setattr(pipeline.models.generation, "sample_latents", recording)
    out = tmp_path / "out"
    cfg = shipped_config(data, out, n=16, shard_size=16)
    summary = run_job(cfg, model=shipped)
    record = json.loads((out / "run.json").read_text())
    pseudo = record["pseudo_classes"]
    assert pseudo["used"] is True and record["reference"]["class_names"] is None
    # every sample is made as a digit the model knows (never its null class 10)
    assert conditions and all(c is not None for c in conditions)
    made = torch.cat([c.cpu() for c in conditions])
    assert {str(d) for d in made.tolist()} <= set(pseudo["class_names"]) and 10 not in made.tolist()
    # the kept classes follow the pseudo-classes' proportions
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    kept = [r for r in rows if r["kept"]]
    assert len(kept) == summary.num_kept == 16
    counts = torch.tensor([pseudo["counts"][name] for name in pseudo["class_names"]], dtype=torch.float64)
    expected = dict(zip(pseudo["class_names"], class_quotas(counts / counts.sum(), 16).tolist(), strict=True))
    assert Counter(r["pseudo_class"] for r in kept) == {k: v for k, v in expected.items() if v}
    # unlabelled output: no class in the manifest's label columns, the samples or their json
    assert all(r["label"] is None and r["class_name"] is None and r["condition"] is None for r in rows)
    assert all(r["pseudo_class"] in pseudo["class_names"] for r in rows)
    samples = list(wds.WebDataset(str(out / "shards" / "synthetic-000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 16
    assert all("cls" not in s and "pseudo_class" not in s["json"] and s["json"]["label"] is None for s in samples)
    assert all(s["json"]["judged_label"] is None and "pseudo_label" not in s["json"] for s in samples)
    # label fidelity reports on the pseudo-classes, and says so
    fidelity = record["label_fidelity"]
    assert fidelity["pseudo"] is True and fidelity["judged"] == 16 and "digit classifier" in fidelity["judge"]
    assert set(fidelity["per_class"]) <= set(pseudo["class_names"])


@pytest.mark.slow
def test_pseudo_labels_writes_the_pseudo_class_as_a_marked_label(data, shipped, tmp_path):
    out = tmp_path / "out"
    run_job(shipped_config(data, out, pseudo_labels=True), model=shipped)
    names = json.loads((out / "run.json").read_text())["pseudo_classes"]["class_names"]
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert all(r["class_name"] == r["pseudo_class"] == names[r["label"]] == r["condition"] for r in rows)
    samples = list(wds.WebDataset(str(out / "shards" / "synthetic-000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 8
    for s in samples:
        meta = s["json"]
        assert meta["pseudo_label"] is True and meta["class_name"] == meta["pseudo_class"] == names[meta["label"]]
        assert int(s["cls"]) == meta["label"]


@pytest.mark.slow
def test_off_or_unreadable_references_fall_back_to_the_null_class(data, shipped, tmp_path):
    off = build_context(shipped_config(data, tmp_path / "off", pseudo_classes=False), shipped, pilot=False)
    assert off.bundle.labels is None and off.model_labels is None and off.proportions is None
    assert off.bundle.pseudo_classes == {"used": False, "reason": "pseudo-classes are off (--no-pseudo-classes)"}
    # the same pixels in a fixed random order: the classifier is not confident about any digit
    unreadable = build_context(shipped_config(data, tmp_path / "shuffled", ref=data["shuffled"]), shipped, pilot=False)
    record = unreadable.bundle.pseudo_classes
    assert unreadable.bundle.labels is None and not unreadable.bundle.pseudo_labels
    assert record["used"] is False and record["mean_confidence"] < 0.8 and "cannot read" in record["reason"]


def test_a_model_without_a_judge_samples_the_null_class_and_run_json_says_why(tmp_path, caplog):
    tiny = {"dit": str(save_tiny_dit(tmp_path / "dit")), "cache": str(tmp_path / "cache")}
    tiny["refs"] = str(write_reference_folder(tmp_path / "refs", count=16))
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="pipeline.checks.pseudo"):
        run_job(tiny_job_config(tiny, out, n=4, shard_size=4, steps=2, strength=0.01, reach_check=False))
    record = json.loads((out / "run.json").read_text())
    assert record["pseudo_classes"]["used"] is False and "no judge" in record["pseudo_classes"]["reason"]
    assert "sampling the model's null class: no judge" in caplog.text
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert all(r["label"] is None and r["pseudo_class"] is None for r in rows)
    assert record["label_fidelity"] is None


def test_the_dry_run_says_pseudo_classes_will_be_tried(data, monkeypatch):
    monkeypatch.setattr(pipeline.jobs.job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["--ref", data["digits"], "--out", str(data["root"] / "dry"), "--n", "8", "--dry-run"]
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "references unlabelled: pseudo-classes will be tried" in result.output
    off = CliRunner().invoke(app, [*base, "--no-pseudo-classes"])
    assert off.exit_code == 0 and "pseudo-classes off (--no-pseudo-classes): the null class" in off.output
    labelled = CliRunner().invoke(
        app, ["--ref", str(THICK_DIGITS), "--out", str(data["root"] / "d2"), "--n", "8", "--dry-run"]
    )
    assert labelled.exit_code == 0 and "pseudo-classes" not in labelled.output
