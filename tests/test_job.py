"""The main job end to end on a tiny latent DiT: shards, manifest, resume, config guard, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from tiny_models import (
    TINY_SUPPORT_RADIUS,
    save_tiny_ddpm,
    save_tiny_dit,
    shard_bytes,
    tiny_job_config,
    write_reference_folder,
)
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import AugmentConfig
from pipeline.jobs.job import run_job
from pipeline.plan import plan_job
from storage.errors import InputError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "dit": str(save_tiny_dit(root / "dit")),
        "ddpm": str(save_tiny_ddpm(root / "ddpm")),
        "refs": str(write_reference_folder(root / "refs", classes=("a", "b"))),
        "plain_refs": str(write_reference_folder(root / "plain", count=16)),
        "cache": str(root / "cache"),
    }


def test_plan_over_generates_to_keep_exactly_n():
    cfg = AugmentConfig(ref="x", n=2500, out="o", keep=0.75, shard_size=1000)
    plan = plan_job(cfg)
    assert [s.num_kept for s in plan.shards] == [1000, 1000, 500]
    assert [s.num_generated for s in plan.shards] == [1334, 1334, 667]
    assert plan.shards[1].first_index == 1334 and plan.num_generated == 3335
    cfg_big = AugmentConfig(ref="x", n=100_000, out="o", keep=0.9)
    assert len(plan_job(cfg_big).shards) == 100  # planned, not held


def test_end_to_end_shards_manifest_and_run_record(tiny, tmp_path):
    cfg = tiny_job_config(tiny, tmp_path / "out")
    summary = run_job(cfg)
    out = tmp_path / "out"
    assert summary.num_kept == 20 and summary.shards_written == 3
    table = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == summary.num_generated >= 10 + 10 + 5  # plus any drawn from reserved indices
    assert summary.num_generated - summary.reserved == 25 and summary.shortfall == 0
    rows = table.to_pylist()
    assert sum(r["kept"] for r in rows) == 20
    assert len({r["key"] for r in rows}) == len(rows)
    # per shard and class: the kept ones are exactly the lowest MMD contributions among those in support
    for shard, label in {(r["shard"], r["label"]) for r in rows}:
        part = [
            r for r in rows if (r["shard"], r["label"]) == (shard, label) and r["rejected_reason"] != "outside_support"
        ]
        part.sort(key=lambda r: r["mmd_contribution"])
        n_kept = sum(r["kept"] for r in part)
        assert all(r["kept"] for r in part[:n_kept]) and not any(r["kept"] for r in part[n_kept:])
    assert all(r["rejected_reason"] is None for r in rows if r["kept"])
    assert all(r["rejected_reason"] in ("rank", "outside_support") for r in rows if not r["kept"])
    # class proportions follow the references (2 balanced classes)
    labels = [r["label"] for r in rows]
    assert abs(labels.count(0) - labels.count(1)) <= 3
    # the shards read back with plain webdataset, unchanged
    urls = sorted(str(p) for p in (out / "shards").glob("synthetic-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 20
    s = samples[0]
    assert "." not in s["__key__"]
    png = Image.open(io.BytesIO(s["png"]))
    assert png.format == "PNG" and png.size == (16, 16) and png.mode == "L"
    meta = s["json"]
    assert meta["config_hash"] == cfg.config_hash and meta["kept"] is True
    assert meta["guidance"]["mode"] == cfg.guidance == "noisy" and isinstance(meta["mmd_contribution"], float)
    assert s["cls"] == meta["label"]
    record = json.loads((out / "run.json").read_text())
    assert record["config_hash"] == cfg.config_hash and record["reference"]["count"] == 24
    assert "torch" in record["versions"]


def test_same_samples_whatever_the_batch_size_for_unguided(tiny, tmp_path):
    a = tiny_job_config(tiny, tmp_path / "a", guidance="none", batch_size=3)
    b = tiny_job_config(tiny, tmp_path / "b", guidance="none", batch_size=10)
    run_job(a)
    run_job(b)
    ta = pq.read_table(tmp_path / "a" / "manifest.parquet").to_pylist()
    tb = pq.read_table(tmp_path / "b" / "manifest.parquet").to_pylist()
    assert [r["seed"] for r in ta] == [r["seed"] for r in tb]
    assert [r["mmd_contribution"] for r in ta] == pytest.approx([r["mmd_contribution"] for r in tb], rel=1e-4)


def test_resume_after_losing_a_shard_is_byte_identical(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_job_config(tiny, out)
    run_job(cfg)
    reference = shard_bytes(out)
    manifest = (out / "manifest.parquet").read_bytes()
    # crash simulation: shard 1 lost its marker and is truncated; a temp file from the dead writer remains
    (out / "shards" / "synthetic-000001.tar.done").unlink()
    (out / "shards" / "synthetic-000001.tar").write_bytes(b"partial")
    (out / "shards" / "synthetic-000002.tar.tmp-999999").write_bytes(b"junk")
    summary = run_job(cfg)
    assert summary.shards_written == 1 and summary.shards_skipped == 2
    assert shard_bytes(out) == reference
    assert (out / "manifest.parquet").read_bytes() == manifest
    assert not list((out / "shards").glob("*.tmp-*"))


def test_different_config_into_same_folder_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    run_job(tiny_job_config(tiny, out, n=8))
    result = CliRunner().invoke(
        app,
        [
            "--ref",
            tiny["refs"],
            "--n",
            "8",
            "--out",
            str(out),
            "--model",
            tiny["dit"],
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--shard-size",
            "8",
            "--progress",
            "quiet",
            "--cache-dir",
            tiny["cache"],
            "--support-radius",
            str(TINY_SUPPORT_RADIUS),  # the tiny model's samples are in no support: the reach check would stop it
        ],
    )
    assert result.exit_code != 0
    assert str(out) in result.output and "different" in result.output.lower()


@pytest.mark.parametrize(
    "make_bad, expect",
    [
        (lambda root: root / "missing", "missing"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no images"),
        (lambda root: _corrupt(root), "bad.png"),
    ],
)
def test_bad_references_exit_nonzero_and_write_nothing(tiny, tmp_path, make_bad, expect):
    ref = make_bad(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "--ref",
            str(ref),
            "--n",
            "4",
            "--out",
            str(out),
            "--model",
            tiny["dit"],
            "--progress",
            "quiet",
            "--cache-dir",
            tiny["cache"],
        ],
    )
    assert result.exit_code == 2, result.output
    assert expect.lower() in result.output.lower()
    assert not out.exists()


def _corrupt(root: Path) -> Path:
    ref = write_reference_folder(root / "refs", count=10)
    (ref / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return ref


def test_dry_run_prints_the_plan(tiny, tmp_path):
    result = CliRunner().invoke(
        app, ["--ref", tiny["refs"], "--n", "100000", "--out", str(tmp_path / "o"), "--keep", "0.8", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "100 shard(s)" in result.output and "125000 samples generated, 100000 kept" in result.output
    assert not (tmp_path / "o").exists()


def test_pixel_space_model_and_plain_references(tiny, tmp_path):
    cfg = tiny_job_config(tiny, tmp_path / "out", model=tiny["ddpm"], ref=tiny["plain_refs"], n=6, guidance="posterior")
    summary = run_job(cfg)
    assert summary.num_kept == 6
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert all(r["label"] is None for r in rows)


def _tiny_support_config(folder: Path) -> Path:
    """A config file with the tiny models' support radius (the CLI has no flag for it)."""
    path = folder / "tiny-support.json"
    path.write_text(json.dumps({"support_radius": TINY_SUPPORT_RADIUS}))
    return path


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_shards(tiny, tmp_path):
    args = [
        "--ref",
        tiny["refs"],
        "--n",
        "24",
        "--model",
        tiny["dit"],
        "--shard-size",
        "4",
        "--steps",
        "12",
        "--batch-size",
        "5",
        "--progress",
        "quiet",
        "--cache-dir",
        tiny["cache"],
        "--config",
        str(_tiny_support_config(tmp_path)),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(_cli([*args, "--out", str(tmp_path / "clean")]), check=True, env=env, cwd=REPO)
    victim = tmp_path / "victim"
    proc = subprocess.Popen(_cli([*args, "--out", str(victim)]), env=env, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not list((victim / "shards").glob("*.done")):
        time.sleep(0.05)
    time.sleep(0.05)  # land somewhere inside the next shard
    proc.kill()
    proc.wait()
    assert len(list((victim / "shards").glob("*.done"))) < 6, "the run finished before it could be killed"
    subprocess.run(_cli([*args, "--out", str(victim)]), check=True, env=env, cwd=REPO)
    assert shard_bytes(victim) == shard_bytes(tmp_path / "clean")
    assert (victim / "manifest.parquet").read_bytes() == (tmp_path / "clean" / "manifest.parquet").read_bytes()


@pytest.mark.slow
def test_two_processes_give_the_same_samples_as_one(tiny, tmp_path):
    one = tiny_job_config(tiny, tmp_path / "one", n=16, shard_size=4)
    run_job(one)
    two = tiny_job_config(tiny, tmp_path / "two", n=16, shard_size=4, processes=2)
    summary = run_job(two)
    assert summary.num_kept == 16
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    workers = {json.loads(p.read_text())["worker"] for p in (tmp_path / "two" / "shards").glob("*.done")}
    assert workers == {"rank0", "rank1"}


@pytest.mark.slow
def test_two_cpu_processes_write_the_shipped_priors_bytes(tmp_path):
    """At the shipped prior's size CPU float reductions depend on the intra-op thread count (the tiny models' do
    not): the workers take the launcher's, so two processes write what one does, scores included."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one process with 2 threads against 2 workers (1 thread each before the fix)
    try:
        common = dict(ref=str(REPO / "examples" / "thick_digits"), n=64, shard_size=32, steps=10, strength=0.16)
        common.update(device="cpu", progress="quiet", cache_dir=str(tmp_path / "cache"))
        run_job(AugmentConfig(out=str(tmp_path / "one"), **common))
        run_job(AugmentConfig(out=str(tmp_path / "two"), processes=2, **common))
    finally:
        torch.set_num_threads(threads)
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")


def test_holdout_split_is_stratified_deterministic_and_recorded(tiny, tmp_path):
    cfg = tiny_job_config(tiny, tmp_path / "out", n=4, holdout=0.25, guidance="none")
    run_job(cfg)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    held, used = record["reference"]["heldout_files"], record["reference"]["files"]
    assert len(held) == 6 and len(used) == 18 and not set(held) & set(used)
    assert sum(f.startswith("a/") for f in held) == 3  # 25% of each class
    again = tiny_job_config(tiny, tmp_path / "out2", n=4, holdout=0.25, guidance="none")
    run_job(again)
    assert json.loads((tmp_path / "out2" / "run.json").read_text())["reference"]["heldout_files"] == held


def test_sequential_coupling_runs_one_sample_at_a_time(tiny, tmp_path):
    cfg = tiny_job_config(tiny, tmp_path / "out", n=4, coupling="sequential", guidance="noisy", kernel="cubic")
    summary = run_job(cfg)
    assert summary.num_kept == 4


def test_same_settings_with_changed_references_are_refused(tiny, tmp_path):
    refs = write_reference_folder(tmp_path / "refs", count=12, classes=("a", "b"))
    out = tmp_path / "out"
    run_job(tiny_job_config(tiny, out, ref=str(refs), n=4, guidance="none"))
    (refs / "a" / "img_000.png").unlink()  # same settings, different reference content
    with pytest.raises(InputError, match="other inputs"):
        run_job(tiny_job_config(tiny, out, ref=str(refs), n=4, guidance="none"))


@pytest.mark.parametrize(
    "n, shard_size, keep, pools",
    [(1, 1000, 0.9, [2]), (1, 1000, 1.0, [1]), (17, 8, 0.9, [9, 9, 2]), (2, 1000, 1.0, [2])],
)
def test_tiny_final_pools_finish(tiny, tmp_path, n, shard_size, keep, pools):
    cfg = tiny_job_config(tiny, tmp_path / "out", n=n, shard_size=shard_size, keep=keep, strength=0.01)
    assert [s.num_generated for s in plan_job(cfg).shards] == pools
    summary = run_job(cfg)
    assert summary.num_kept == n and summary.shortfall == 0


def test_samples_outside_the_support_are_never_kept_and_are_replaced(tiny, tmp_path):
    probe = tiny_job_config(tiny, tmp_path / "probe", n=16, shard_size=16, strength=0.01)
    run_job(probe)
    bandwidth = json.loads((tmp_path / "probe" / "run.json").read_text())["reference"]["bandwidth"]
    nearest = pq.read_table(tmp_path / "probe" / "manifest.parquet")["nearest_reference_distance"].to_pylist()
    radius = sorted(nearest)[len(nearest) // 3] / bandwidth  # about two thirds of the pool fall outside
    cfg = tiny_job_config(tiny, tmp_path / "out", n=16, shard_size=8, strength=0.01, support_radius=radius)
    summary = run_job(cfg)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    kept = [r for r in rows if r["kept"]]
    assert all(r["nearest_reference_distance"] <= radius * bandwidth * (1 + 1e-4) for r in kept)
    outside = [r for r in rows if r["rejected_reason"] == "outside_support"]
    assert len(outside) > len(rows) // 3 and summary.rejected["outside_support"] == len(outside)
    reserved = [r for r in rows if r["reserved"]]
    assert reserved and min(r["index"] for r in reserved) >= plan_job(cfg).num_generated
    assert summary.reserved == len(reserved)
    assert len(kept) + summary.shortfall == 16
    # per shard and class, exactly the plan's share is kept (unless the reserve ran out)
    if summary.shortfall == 0:
        for shard in (0, 1):
            labels = [r["label"] for r in kept if r["shard"] == shard]
            assert sorted([labels.count(0), labels.count(1)]) == [4, 4]
    # resuming redoes a lost shard with the same reserved samples, byte for byte
    reference = shard_bytes(tmp_path / "out")
    (tmp_path / "out" / "shards" / "synthetic-000001.tar.done").unlink()
    run_job(cfg)
    assert shard_bytes(tmp_path / "out") == reference


def test_labelled_runs_report_label_fidelity(tiny, tmp_path):
    cfg = tiny_job_config(tiny, tmp_path / "out", n=8, shard_size=8, strength=0.01)
    summary = run_job(cfg)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    fidelity = record["label_fidelity"]
    assert fidelity == summary.label_fidelity and fidelity["judged"] == 8
    assert "NN vote" in fidelity["judge"] and 0.0 <= fidelity["rate"] <= 1.0
    assert sum(c["judged"] for c in fidelity["per_class"].values()) == 8
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert all(r["judged_label"] in (0, 1) for r in rows if r["kept"])
    assert fidelity["agreed"] == sum(r["judged_label"] == r["label"] for r in rows if r["kept"])


def test_label_filter_rejects_samples_judged_another_class(tiny, tmp_path):
    cfg = tiny_job_config(tiny, tmp_path / "out", n=8, shard_size=8, strength=0.01, label_filter=True)
    summary = run_job(cfg)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert all(r["judged_label"] == r["label"] for r in rows if r["kept"])
    assert summary.rejected.get("label", 0) == sum(r["rejected_reason"] == "label" for r in rows)
    assert summary.num_kept + summary.shortfall == 8


def test_a_run_that_keeps_nothing_fails_with_one_line_and_leaves_the_folder_free(tiny, tmp_path):
    """Exit 2 writes nothing: the corrected settings the message advises then run into the same --out."""
    out = tmp_path / "out"
    cfg = tiny_job_config(
        tiny, out, n=4, shard_size=4, strength=0.01, support_radius=1e-9, reserve=0.5, reach_check=False
    )  # without the reach check, which would stop this job before its first sample (tests/test_reach.py)
    with pytest.raises(InputError, match="every one of the 8 generated samples was rejected .*outside support"):
        run_job(cfg)
    assert not out.exists() or not any(out.iterdir())
    summary = run_job(tiny_job_config(tiny, out, n=4, shard_size=4, strength=0.01, reserve=0.5))
    assert summary.num_kept + summary.shortfall == 4
