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
from pipeline.jobs.worker import to_png
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


# --------------------------------------------------------------------------------------------------------
# Training recipes of the decision suite (tiny random data, a few steps)
# --------------------------------------------------------------------------------------------------------


def _tiny(n: int, seed: int, classes=("a", "b", "c")):
    import torch

    from pipeline.evaluation.utility import LabelledImages

    gen = torch.Generator().manual_seed(seed)
    return LabelledImages(
        torch.rand(n, 1, 16, 16, generator=gen) * 2 - 1, torch.arange(n) % len(classes), list(classes)
    )


def test_random_affine_keeps_shape_and_changes_images():
    import torch

    from pipeline.evaluation.utility import random_affine

    x = torch.full((4, 1, 32, 32), -1.0)
    x[:, :, 8:24, 14:18] = 1.0  # a bar on a black background
    y = random_affine(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert all((y[i] - x[i]).abs().max() > 0.1 for i in range(4))  # every image moved
    assert not torch.allclose(y[0], y[1])  # each image its own map
    assert y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6 and y[:, :, 0, 0].eq(-1).all()  # background kept
    same = random_affine(x, torch.Generator().manual_seed(0), rotation=0, translation=0, scale=(1, 1), shear=0)
    assert torch.allclose(same, x, atol=1e-5)  # the identity map is the identity
    again = random_affine(x, torch.Generator().manual_seed(0))
    assert torch.equal(again, y)  # seeded


def test_balanced_sampler_draws_half_real_half_synthetic():
    import torch

    from pipeline.evaluation.utility import batch_sampler

    real, syn = _tiny(10, 0), _tiny(90, 1)
    gen = torch.Generator().manual_seed(0)
    draw = batch_sampler(real, syn, 64, real_share=0.5)
    for _ in range(5):
        x, y, is_real = draw(gen)
        assert x.shape == (64, 1, 16, 16) and len(y) == 64
        assert int(is_real.sum()) == 32  # exactly half from the references
    uniform = batch_sampler(real, syn, 64)
    share = torch.cat([uniform(gen)[2] for _ in range(50)]).double().mean()
    assert 0.05 < float(share) < 0.16  # uniform over the union: ~10% references
    alone = batch_sampler(real, None, 8)
    assert alone(gen)[2].all()
    # affine: only the references are transformed, the synthetic samples are used as they are
    aug = batch_sampler(real, syn, 32, real_share=0.5, affine=True)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xa, _, ra = aug(gen_a)
    xb, _, _ = batch_sampler(real, syn, 32, real_share=0.5)(gen_b)
    assert torch.equal(xa[~ra], xb[~ra]) and not torch.allclose(xa[ra], xb[ra])


def test_recipes_train_and_return_accuracies():
    from pipeline.evaluation.utility import RECIPES, train_and_test, train_recipe

    real, syn, test = _tiny(12, 0), _tiny(24, 1), _tiny(15, 2)
    for recipe in RECIPES:
        for affine in (False, True):
            out = train_recipe(recipe, real, syn, test, seed=0, steps=3, batch_size=8, affine=affine)
            assert 0.0 <= out["accuracy"] <= 1.0 and set(out["per_class"]) <= set(real.classes)
            assert out["steps"] == (4 if recipe == "finetune" else 3)  # fine-tuning adds 1/3 more steps
    # the mix of the references alone is today's train_and_test, step for step
    assert train_recipe("mix", real, None, test, seed=1, steps=4, batch_size=8) == dict(
        train_and_test(real, test, seed=1, steps=4, batch_size=8), steps=4
    )
    with pytest.raises(ValueError, match="unknown recipe"):
        train_recipe("nope", real, syn, test, seed=0, steps=1)
