"""`augment eval` end to end on tiny runs: eval.json, report.html (rendered in headless Chromium), the
held-out sources, feature spaces (VAE default, user extractor, shipped classifier) and the command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from tiny_models import TINY_SUPPORT_RADIUS, save_tiny_dit, write_reference_folder
from typer.testing import CliRunner

from pipeline.config import AugmentConfig
from pipeline.evaluation.cli import eval_command
from pipeline.evaluation.run_eval import evaluate_run
from pipeline.jobs.job import run_job
from pipeline.measures import features as features_module
from pipeline.models.shipped import DigitClassifier

FAST = dict(n_permutations=100, kid_subsets=10)


def mean_pool_features(images: torch.Tensor) -> torch.Tensor:
    """A user extractor for the import-path test: 4×4 average pooling, flattened."""
    return torch.nn.functional.avg_pool2d(images, 4).flatten(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dit = str(save_tiny_dit(root / "dit"))
    refs = write_reference_folder(root / "refs", count=32, classes=("3", "7"))
    plain = write_reference_folder(root / "plain", count=16, seed=1)
    heldout = write_reference_folder(root / "heldout", count=12, seed=2)
    common = dict(model=dit, steps=2, batch_size=8, cache_dir=str(root / "cache"), progress="quiet")
    common["support_radius"] = TINY_SUPPORT_RADIUS
    labelled = AugmentConfig(
        ref=str(refs),
        out=str(root / "labelled"),
        n=24,
        shard_size=12,
        keep=0.75,
        holdout=0.25,
        keep_rejected=True,
        **common,
    )
    unlabelled = AugmentConfig(ref=str(plain), out=str(root / "plain_run"), n=12, shard_size=12, keep=0.9, **common)
    run_job(labelled)
    run_job(unlabelled)
    return {"root": root, "labelled": Path(labelled.out), "plain": Path(unlabelled.out), "heldout": str(heldout)}


@pytest.fixture(scope="module")
def evaluated(runs):
    """The labelled run evaluated with the defaults (features auto -> the tiny DiT's VAE latents)."""
    return evaluate_run(runs["labelled"], seed=0, **FAST)


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_run_writes_eval_json_and_a_self_contained_report(runs, evaluated):
    run = runs["labelled"]
    on_disk = _strict_json(run / "eval.json")
    assert on_disk["settings"]["features"] == "vae" and on_disk["settings"]["feature_dim"] == 4 * 8 * 8
    assert "held out of guidance" in on_disk["settings"]["heldout_source"]
    assert on_disk["counts"] == {
        "generated": 32, "kept": 24, "rejected": 8, "evaluated_kept": 24, "evaluated_rejected": 8,
        "heldout_references": 8, "guidance_references": 24,
    }  # fmt: skip
    assert set(on_disk["sets"]) == {"kept", "generated", "guidance_references"}
    kept = on_disk["sets"]["kept"]
    assert kept["mmd"]["n_permutations"] == 100 and 0 < kept["mmd"]["p_value"] <= 1
    assert kept["kid"]["subset_size"] == 4 and kept["prdc"]["k"] == 5 and kept["fd"]["fd"] >= 0
    assert on_disk["sets"]["generated"]["mmd"]["n"] == 32
    assert set(on_disk["memorisation"]) == {"vae", "pixels"} and on_disk["memorisation"]["vae"]["m"] == 24
    assert on_disk["class_accuracy"]["knn"]["n"] == 24
    assert set(on_disk["class_accuracy"]["knn"]["per_class"]) == {"3", "7"}
    assert on_disk["filter_scores"]["kept"]["count"] == 24 and on_disk["filter_scores"]["rejected"]["count"] == 8
    # small samples are flagged, not hidden
    warnings = " ".join(on_disk["warnings"])
    assert "< 2 × dim" in warnings and "10 × k" in warnings and "resolution" in warnings
    assert on_disk["sets"] == json.loads(json.dumps(evaluated["sets"]))  # same numbers returned and written
    html = (run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4
    assert "<table" in html and "Fréchet distance" in html and "near-copies" in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing external
    assert "Warnings" in html


def test_evaluation_is_deterministic_for_a_seed(runs):
    a = evaluate_run(runs["plain"], features="pixels", seed=3, write=False, **FAST)
    b = evaluate_run(runs["plain"], features="pixels", seed=3, write=False, **FAST)
    assert a["sets"] == b["sets"] and a["memorisation"] == b["memorisation"]


def test_separate_heldout_folder_and_reused_guidance_references(runs, tmp_path):
    run = runs["plain"]
    separate = evaluate_run(run, heldout=runs["heldout"], features="pixels", write=False, **FAST)
    assert separate["settings"]["heldout_source"].startswith("separate folder")
    assert separate["counts"]["heldout_references"] == 12 and separate["counts"]["guidance_references"] == 16
    assert "guidance_references" in separate["sets"] and separate["class_accuracy"] == {}
    reused = evaluate_run(run, features="pixels", out_dir=tmp_path, **FAST)
    assert reused["settings"]["heldout_reused_guidance_references"] is True
    assert set(reused["sets"]) == {"kept"}  # no rejected on disk, no separate real baseline
    assert any("optimistic" in w for w in reused["warnings"])
    assert any("--keep-rejected" in w for w in reused["warnings"])
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "report.html").is_file()
    assert "optimistic" in (tmp_path / "report.html").read_text()


def test_user_feature_extractor_by_import_path(runs):
    result = evaluate_run(runs["plain"], features="test_eval_run:mean_pool_features", write=False, **FAST)
    assert result["settings"]["features"] == "test_eval_run:mean_pool_features"
    assert result["settings"]["feature_dim"] == 16  # 1 × (16/4) × (16/4)
    with pytest.raises(ValueError, match="unknown feature space"):
        evaluate_run(runs["plain"], features="nonsense", write=False, **FAST)


def test_shipped_prior_runs_use_the_classifier_features_and_accuracy(runs, tmp_path, monkeypatch):
    # a stand-in for the shipped model folder: only the classifier is needed for evaluation
    torch.manual_seed(0)
    shipped = tmp_path / "shipped"
    DigitClassifier(in_channels=1, num_classes=10, width=8).eval().save_pretrained(shipped / "classifier")
    (shipped / "shipped.json").write_text(json.dumps({"image_size": 16}))
    monkeypatch.setattr(features_module, "SHIPPED_MODEL_DIR", shipped)
    run = tmp_path / "run"
    shutil.copytree(runs["labelled"], run)
    record = json.loads((run / "run.json").read_text())
    record["config"]["model"] = None  # as if the run had used the shipped prior (class folders "3", "7")
    (run / "run.json").write_text(json.dumps(record))
    result = evaluate_run(run, write=False, **FAST)
    assert result["settings"]["features"] == "classifier" and result["settings"]["feature_dim"] == 32
    acc = result["class_accuracy"]
    assert {"classifier", "classifier_on_references", "knn", "knn_real_baseline"} <= set(acc)
    assert acc["classifier"]["n"] == 24 and 0.0 <= acc["classifier"]["accuracy"] <= 1.0
    assert set(acc["classifier_on_references"]["per_class"]) == {"3", "7"}


def test_eval_command(runs, tmp_path):
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)  # a group, as in pipeline/cli/commands.py
    runner = CliRunner()
    args = ["eval", str(runs["plain"]), "--features", "pixels", "--permutations", "50", "--kid-subsets", "5"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "MMD²" in result.output and "report.html" in result.output
    assert _strict_json(tmp_path / "ev" / "eval.json")["settings"]["n_permutations"] == 50
    bad = runner.invoke(app, ["eval", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "error:" in bad.output and "run.json" in bad.output


_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_PROBE = """<script>
window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(function (img, i) {
    img.setAttribute('data-probe', img.complete + ':' + img.naturalWidth + 'x' + img.naturalHeight);
  });
  document.body.setAttribute('data-tables', document.querySelectorAll('table').length);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        _CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(_CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(runs, evaluated, tmp_path):
    report = runs["labelled"] / "report.html"
    # a copy with a probe script that records, after load, whether each image decoded
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    probes = re.findall(r'data-probe="([^"]*)"', dom.stdout)
    assert len(probes) == 4, dom.stdout[:2000]
    for probe in probes:
        complete, size = probe.split(":")
        width, height = (int(v) for v in size.split("x"))
        assert complete == "true" and width > 100 and height > 100, probe
    assert int(re.search(r'data-tables="(\d+)"', dom.stdout).group(1)) >= 4
    assert "MMD² (RBF, median bandwidth, unbiased)" in dom.stdout
    # and it paints: a full-page screenshot of the report itself is not blank
    shot = tmp_path / "shot.png"
    painted = _chromium(tmp_path, "--window-size=1280,3000", f"--screenshot={shot}", report.as_uri())
    assert painted.returncode == 0 and shot.is_file(), painted.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1280) and pixels.std() > 10


def test_eval_json_is_strict_json(tmp_path):
    from storage.eval_io import write_eval_json

    write_eval_json(tmp_path, {"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": np.float64("nan")}})
    assert _strict_json(tmp_path / "eval.json") == {"a": None, "b": [None, 1.0], "c": {"d": None}}
