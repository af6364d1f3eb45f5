"""The training example streams augment shards (mixed with a real folder), alone and under torchrun."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_models import TINY_SUPPORT_RADIUS, save_tiny_dit, write_reference_folder

from pipeline.config import AugmentConfig
from pipeline.jobs.job import run_job

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_classifier.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    refs = write_reference_folder(root / "refs", count=16, classes=("cat", "dog"))
    cfg = AugmentConfig(
        ref=str(refs),
        n=16,
        out=str(root / "out"),
        model=str(save_tiny_dit(root / "dit")),
        shard_size=8,
        batch_size=8,
        steps=3,
        cache_dir=str(root / "cache"),
        progress="quiet",
        support_radius=TINY_SUPPORT_RADIUS,
    )
    run_job(cfg)
    shards = sorted(str(p) for p in (root / "out" / "shards").glob("synthetic-*.tar"))
    return {"refs": str(refs), "shards": shards, "out": root / "out"}


def test_example_trains_on_mixed_stream_and_reports_accuracy(run):
    ex = _load_example()
    args = ex.parse_args(
        [
            "--shards",
            *run["shards"][:1],
            "--real",
            run["refs"],
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--eval-dir",
            run["refs"],
            "--log-every",
            "0",
        ]
    )
    args.shards = run["shards"]
    result = ex.train(args)
    assert result["classes"] == ["cat", "dog"]
    assert result["eval"]["n"] == 16 and 0.0 <= result["eval"]["accuracy"] <= 1.0
    assert set(result["eval"]["per_class"]) == {"cat", "dog"}  # keyed by the folder names
    # synthetic-only training also works (labels from each sample's class_name)
    args = ex.parse_args(["--classes", "cat,dog", "--synthetic-fraction", "1", "--steps", "3", "--log-every", "0"])
    args.shards = run["shards"]
    assert ex.train(args)["classes"] == ["cat", "dog"]


def test_example_recipes_and_affine(run):
    import torch

    ex = _load_example()
    common = ["--real", run["refs"], "--steps", "3", "--batch-size", "8", "--log-every", "0"]
    args = ex.parse_args(["--shards", *run["shards"][:1], *common, "--recipe", "pretrain", "--affine", "all"])
    args.shards = run["shards"]
    result = ex.train(args)
    assert result["steps"] == 4 and (result["recipe"], result["affine"]) == ("pretrain", "all")  # +1/3 fine-tuning
    args = ex.parse_args(["--shards", *run["shards"][:1], *common, "--recipe", "finetune", "--affine", "real"])
    args.shards = run["shards"]
    assert ex.train(args)["steps"] == 4
    with pytest.raises(SystemExit):  # pretrain needs synthetic shards
        ex.train(ex.parse_args([*common, "--recipe", "pretrain"]))
    with pytest.raises(SystemExit):
        ex.parse_args([*common, "--affine", "sometimes"])
    x = torch.full((1, 16, 16), -1.0)
    x[:, 4:12, 7:9] = 1.0
    torch.manual_seed(0)
    y = ex.random_affine(x)
    assert y.shape == x.shape and (y - x).abs().max() > 0.1 and y[0, 0, 0] == -1.0  # moved, background kept


def test_shards_load_with_hugging_face_datasets(run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(run["out"].parent / "hf-cache"))
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": run["shards"]}, split="train")
    assert ds.num_rows == 16
    first = ds[0]
    assert first["png"].size == (16, 16) and first["json"]["class_name"] in ("cat", "dog")
    assert first["cls"] == first["json"]["label"]


def test_manifest_filters_with_pyarrow(run):
    table = pq.read_table(run["out"] / "manifest.parquet", filters=[("kept", "=", True), ("class_name", "=", "dog")])
    assert table.num_rows > 0 and set(table.column("class_name").to_pylist()) == {"dog"}


@pytest.mark.slow
def test_example_under_torchrun_two_processes(run, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(EXAMPLE),
        "--shards",
        *run["shards"],
        "--real",
        run["refs"],
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--save",
        str(tmp_path / "w.pt"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "w.pt").exists()
    assert "step     0" in done.stdout
