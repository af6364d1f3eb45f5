"""The four faults a probe found in what a run's owner holds (issue 30), each fixed in `RunFolder` or `Run`:

1. a crashed run's temporary shard whose pid is alive again (a restarted container) is removed at the next start;
2. a full disk is exit 2 with one `error:` line naming the folder, and nothing partial is left looking complete;
3. `augment utility` on an unfinished run is exit 2 with one line, as `augment eval`;
4. `--dry-run` refuses what the run refuses, and the run refuses it before it loads the model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import TINY_SUPPORT_RADIUS, save_tiny_dit, shard_bytes, write_reference_folder
from typer.testing import CliRunner

import pipeline.jobs.job
import storage.manifest
import storage.shards
from flows.cli import app
from storage.run_folder import TOKEN_FILE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    settings = root / "tiny.json"
    settings.write_text(json.dumps({"support_radius": TINY_SUPPORT_RADIUS}))
    return {
        "root": root,
        "dit": str(save_tiny_dit(root / "dit")),
        "refs": str(write_reference_folder(root / "refs", classes=("a", "b"))),
        "cache": str(root / "cache"),
        "settings": str(settings),
    }


def args(tiny, out: Path, *extra: str) -> list[str]:
    base = ["--ref", tiny["refs"], "--n", "12", "--out", str(out), "--model", tiny["dit"], "--shard-size", "6"]
    base += ["--batch-size", "6", "--steps", "3", "--strength", "0.05", "--no-reach-check", "--progress", "quiet"]
    return [*base, "--cache-dir", tiny["cache"], "--config", tiny["settings"], *extra]


def invoke(argv: list[str]):
    return CliRunner().invoke(app, argv)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def finished(tiny):
    out = tiny["root"] / "finished"
    result = invoke(args(tiny, out))
    assert result.exit_code == 0, result.output
    return out


def test_a_stale_temp_file_with_the_current_pid_is_removed_and_the_resume_is_identical(tiny, finished, tmp_path):
    out = tmp_path / "crashed"
    shutil.copytree(finished, out)
    expected = shard_bytes(out)
    # as after kill -9 mid-shard: shard 1 half-written by a process whose pid this one now has
    (out / "shards" / "synthetic-000001.tar").unlink()
    (out / "shards" / "synthetic-000001.tar.done").unlink()
    stale = out / "shards" / f"synthetic-000001.tar.tmp-{os.getpid()}-abcd1234"
    stale.write_bytes(b"truncated tar")
    old_token = (out / TOKEN_FILE).read_text()
    result = invoke(args(tiny, out))
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not list(out.rglob("*.tmp-*"))
    assert shard_bytes(out) == expected
    assert (out / TOKEN_FILE).read_text() != old_token  # every start gives the run a fresh token


@pytest.mark.parametrize("where", ["shard", "merge"])
def test_a_full_disk_is_exit_2_with_one_line_and_a_rerun_with_space_resumes(
    tiny, finished, tmp_path, monkeypatch, where
):
    out = tmp_path / "full"

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "shard":  # the second shard's tar, mid-write
        real = storage.shards._HashingWriter.write

        def write(self, data):
            if "synthetic-000001.tar" in self.f.name and self.size > 1000:
                no_space()
            return real(self, data)

        monkeypatch.setattr(storage.shards._HashingWriter, "write", write)
    else:
        monkeypatch.setattr(storage.manifest.pq, "ParquetWriter", no_space)
    result = invoke(args(tiny, out))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert str(out) in line and "out of disk space" in line and "rerun the same command" in line
    assert "Traceback" not in result.output
    assert not list(out.rglob("*.tmp-*"))  # nothing partial left
    assert not (out / "manifest.parquet").exists() and not (out / "run.json").exists()
    for marker in (out / "shards").glob("*.done"):  # what is marked done is whole
        assert storage.shards.is_done(out, "synthetic", int(marker.name.split("-")[1].split(".")[0]))
    monkeypatch.undo()
    again = invoke(args(tiny, out))
    assert again.exit_code == 0, again.output
    assert shard_bytes(out) == shard_bytes(finished)


def test_utility_on_an_unfinished_run_is_exit_2_with_one_line(tiny, finished, tmp_path):
    out = tmp_path / "half"
    shutil.copytree(finished, out)
    (out / "manifest.parquet").unlink()
    (out / "run.json").unlink()
    for command in (["utility", str(out), "--real", tiny["refs"]], ["eval", str(out)]):
        result = invoke(command)
        assert result.exit_code == 2, result.output
        (line,) = error_lines(result.output)
        assert "has not finished" in line


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline.jobs.job, "load_model", refuse)


def _small_references(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(10):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(root / f"r{i}.png")
    return root


@pytest.mark.parametrize("case", ["out is a file", "changed setting", "too small for the model"])
def test_dry_run_refuses_what_the_run_refuses_and_the_run_before_loading_the_model(
    tiny, finished, tmp_path, no_model_loading, case
):
    out = tmp_path / "out"
    extra: list[str] = []
    ref = None
    if case == "out is a file":
        out.write_text("not a folder")
    elif case == "changed setting":
        shutil.copytree(finished, out)
        extra = ["--seed", "7"]
    else:  # 8x8 references for the shipped prior (32x32): its config says so without loading it
        ref = str(_small_references(tmp_path / "small"))
    argv = args(tiny, out, *extra)
    if ref is not None:
        argv[argv.index("--ref") + 1] = ref
        argv[argv.index("--model") : argv.index("--model") + 2] = []  # the shipped prior
    for mode in (["--dry-run"], []):
        result = invoke([*argv, *mode])
        assert result.exit_code == 2, (mode, result.output, result.exception)
        (line,) = error_lines(result.output)
        assert {"out is a file": "not a folder", "changed setting": "different configuration"}.get(
            case, "too small for the model"
        ) in line


def test_dry_run_prints_the_references_warnings(tiny, tmp_path, no_model_loading):
    refs = tmp_path / "refs"
    shutil.copytree(tiny["refs"], refs)
    (refs / "a" / "big.png").unlink(missing_ok=True)
    Image.fromarray(np.zeros((64, 48), dtype=np.uint8), mode="L").save(refs / "a" / "odd.png")  # another size
    argv = args(tiny, tmp_path / "out", "--dry-run")
    argv[argv.index("--ref") + 1] = str(refs)
    result = invoke(argv)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings and any("64" in line or "size" in line for line in warnings), result.output
    assert not (tmp_path / "out").exists()
