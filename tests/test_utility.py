"""Utility evaluation on a case with a known answer: separable real classes, synthetic data whose labels are
correct (helps) or flipped (arm (c) must score ~0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.evaluation.report import render_report
from pipeline.evaluation.utility import utility_eval
from pipeline.worker import to_png
from storage.eval_io import write_eval_json, write_report_html
from storage.manifest import merge_manifest, write_manifest_part
from storage.run_record import write_run_record
from storage.shards import write_shard

CLASSES = ("bright", "dark")


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    base = 200 if kind == "bright" else 40
    return np.clip(base + rng.normal(0, 20, (32, 32)), 0, 255).astype(np.uint8)


def _real_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_image(c, rng), mode="L").save(root / c / f"{i}.png")
    return root


def _fake_run(root: Path, n: int, flip: bool, seed: int) -> Path:
    """A run folder in the augment format: images of one class labelled (correctly or not)."""
    import torch

    rng = np.random.default_rng(seed)
    samples, rows = [], []
    for i in range(n):
        drawn = CLASSES[i % 2]
        label_name = CLASSES[1 - i % 2] if flip else drawn
        img = torch.from_numpy(_image(drawn, rng)).float()[None] / 127.5 - 1
        key = f"synthetic_{i:09d}"
        samples.append(
            {"__key__": key, "png": to_png(img), "json": {"class_name": label_name}, "cls": CLASSES.index(label_name)}
        )
        rows.append(
            {
                "key": key,
                "index": i,
                "shard": 0,
                "seed": i,
                "label": CLASSES.index(label_name),
                "class_name": label_name,
                "condition": label_name,
                "mmd_contribution": 0.0,
                "kept": True,
                "rank_in_shard": i,
                "config_hash": "x",
                "model_id": "fake",
            }
        )
    write_manifest_part(root, 0, rows)
    merge_manifest(root)
    write_shard(root, "synthetic", 0, samples)
    write_run_record(root, {"config": {"prefix": "synthetic"}, "config_hash": "x"})
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("utility")
    return {
        "real": _real_folder(root / "real", 10, 0),
        "test": _real_folder(root / "test", 20, 1),
        "good": _fake_run(root / "good", 40, flip=False, seed=2),
        "flipped": _fake_run(root / "flipped", 40, flip=True, seed=3),
    }


def test_known_answers(folders):
    good = utility_eval(
        folders["good"], folders["real"], real_test=folders["test"], unguided_run=folders["flipped"], seeds=2, steps=25
    )
    arms = good["arms"]
    assert arms["a_real"]["accuracy_mean"] == pytest.approx(1.0)
    assert arms["c_synthetic"]["accuracy_mean"] == pytest.approx(1.0)  # correct labels: perfect
    assert arms["b_real_plus_synthetic"]["accuracy_mean"] == pytest.approx(1.0)
    assert arms["d_real_plus_unguided"]["n_train"] == 20 + 40
    flipped = utility_eval(folders["flipped"], folders["real"], real_test=folders["test"], seeds=1, steps=25)
    assert flipped["arms"]["c_synthetic"]["accuracy_mean"] == pytest.approx(0.0)  # flipped labels: always wrong
    assert set(flipped["arms"]["c_synthetic"]["per_class"]) == set(CLASSES)


def test_cli_writes_utility_json_and_rejects_unlabelled_real(folders, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "utility",
            str(folders["good"]),
            "--real",
            str(folders["real"]),
            "--real-test",
            str(folders["test"]),
            "--seeds",
            "1",
            "--steps",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "a_real" in result.output
    assert json.loads((folders["good"] / "utility.json").read_text())["settings"]["n_synthetic"] == 40
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(10):
        Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(plain / f"{i}.png")
    bad = CliRunner().invoke(app, ["utility", str(folders["good"]), "--real", str(plain)])
    assert bad.exit_code == 2 and "class sub-folders" in bad.output


def test_utility_tables_are_added_to_an_existing_eval_report(folders, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(folders["good"], run)
    write_eval_json(run, {"settings": {}, "counts": {}})
    write_report_html(run, render_report({"settings": {}}, []))
    args = ["utility", str(run), "--real", str(folders["real"]), "--real-test", str(folders["test"])]
    for _ in range(2):  # a second run replaces the section instead of appending another
        result = CliRunner().invoke(app, [*args, "--seeds", "1", "--steps", "5"])
        assert result.exit_code == 0, result.output
    html = (run / "report.html").read_text()
    assert html.count('id="utility"') == 1
    assert "(b) real + synthetic (this run)" in html and "held-out real test images" in html
    assert html.index('id="utility"') < html.index("<h2>Settings</h2>")
    record = json.loads((run / "eval.json").read_text())
    assert record["utility"]["settings"]["n_synthetic"] == 40
    assert set(record["utility"]["arms"]) == {"a_real", "b_real_plus_synthetic", "c_synthetic"}
