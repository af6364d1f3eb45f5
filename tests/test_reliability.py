"""Issue 16: every mistake gets one line and exit code 2 (nothing written), every run can finish."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_SUPPORT_RADIUS, save_tiny_dit, shard_bytes, tiny_job_config, write_reference_folder
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.jobs.job import pending_shards, run_job
from pipeline.plan import plan_job
from storage.errors import InputError
from storage.run_record import claim_output, release_output

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-reliability")
    support = root / "tiny-support.json"  # the tiny random models' samples lie far from the references
    support.write_text(json.dumps({"support_radius": TINY_SUPPORT_RADIUS}))
    return {
        "dit": str(save_tiny_dit(root / "dit")),
        "refs": str(write_reference_folder(root / "refs", classes=("a", "b"))),
        "cache": str(root / "cache"),
        "support": str(support),
    }


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished run (3 shards) to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_job(tiny_job_config(tiny, out))
    return out


# ------------------------------------------------------------------------------ a run that can finish


@pytest.mark.parametrize("lose", ["manifest", "manifest/part-000001.parquet", "corrupt part"])
def test_lost_manifest_parts_are_regenerated(tiny, finished, tmp_path, lose):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    if lose == "corrupt part":
        (out / "manifest" / "part-000002.parquet").write_bytes(b"PAR1 truncated")
    elif lose == "manifest":
        shutil.rmtree(out / "manifest")
    else:
        (out / lose).unlink()
    summary = run_job(tiny_job_config(tiny, out))
    assert summary.num_kept == 20
    assert summary.shards_written == {"manifest": 3}.get(lose, 1)
    assert shard_bytes(out) == shard_bytes(finished)
    assert (out / "manifest.parquet").read_bytes() == (finished / "manifest.parquet").read_bytes()


class _Stop(Exception):
    pass


def _peak_python_memory_of_first_shard(tiny, out, n: int) -> int:
    def stop(_result) -> None:
        raise _Stop

    tracemalloc.start()
    try:
        with pytest.raises(_Stop):
            run_job(tiny_job_config(tiny, out, n=n, shard_size=4, guidance="none"), on_shard=stop)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_a_run_is_flat_in_n(tiny, tmp_path):
    small = _peak_python_memory_of_first_shard(tiny, tmp_path / "small", 8)
    huge = _peak_python_memory_of_first_shard(tiny, tmp_path / "huge", 10**10)
    assert huge - small < 1_000_000, (small, huge)
    assert len(list((tmp_path / "huge" / "shards").glob("*.tar"))) == 1
    cfg = tiny_job_config(tiny, tmp_path / "huge", n=10**10, shard_size=4, guidance="none")
    pending = pending_shards(cfg, plan_job(cfg))
    assert len(pending) == 2_500_000_000 - 1 and pending[0] == 1 and 0 not in pending


# --------------------------------------------------------------------------------- misleading output


def test_rejected_samples_have_their_own_folder(tiny, tmp_path):
    out = tmp_path / "out"
    run_job(tiny_job_config(tiny, out, n=8, keep_rejected=True))
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["synthetic-000000.tar"]
    assert sorted(p.name for p in (out / "rejected").glob("*.tar")) == ["synthetic_rejected-000000.tar"]


def test_the_references_are_compared_by_content_not_by_the_ref_text(tiny, tmp_path, monkeypatch):
    shutil.copytree(tiny["refs"], tmp_path / "data" / "refs")
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "data")
    assert run_job(tiny_job_config(tiny, out, ref="refs", n=4)).shards_written == 1
    for ref in ("refs/", "./refs", str(tmp_path / "data" / "refs"), "../data/refs"):
        if ref.startswith(".."):
            monkeypatch.chdir(tmp_path / "elsewhere")
        summary = run_job(tiny_job_config(tiny, out, ref=ref, n=4))
        assert (summary.shards_written, summary.shards_skipped) == (0, 1), ref
    shutil.move(tmp_path / "data" / "refs", tmp_path / "moved")
    assert run_job(tiny_job_config(tiny, out, ref=str(tmp_path / "moved"), n=4)).shards_skipped == 1


def _cli_args(tiny, out, *extra: str) -> list[str]:
    return [
        "--ref", tiny["refs"], "--n", "8", "--out", str(out), "--model", tiny["dit"], "--steps", "4",
        "--shard-size", "8", "--progress", "quiet", "--cache-dir", tiny["cache"], "--config", tiny["support"], *extra,
    ]  # fmt: skip


def test_a_second_run_into_the_same_folder_exits_2_naming_the_first(tiny, tmp_path, hold_output_lock):
    out = tmp_path / "out"
    cfg = tiny_job_config(tiny, out, n=8)
    first = hold_output_lock(out, cfg.config_hash, cfg.hashed_fields())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = CliRunner().invoke(app, _cli_args(tiny, out))
    assert result.exit_code == 2, result.output
    assert "another run is writing to this folder" in result.output and f"pid {first.pid}" in result.output
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    first.kill()
    first.wait()
    result = CliRunner().invoke(app, _cli_args(tiny, out))
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- one line, exit 2, nothing written


def _refs_copy(tiny, tmp_path) -> Path:
    refs = tmp_path / "refs"
    shutil.copytree(tiny["refs"], refs)
    return refs


def _fails_cleanly(tiny, ref, out, expect: str, *extra: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line containing `expect`, and leave `out` absent."""
    args = _cli_args(tiny, out, *extra)
    args[args.index("--ref") + 1] = str(ref)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], result.output
    assert "Traceback" not in result.output and not Path(out).exists()
    return errors[0]


def test_a_symbolic_link_loop_in_the_references_is_named(tiny, tmp_path):
    refs = _refs_copy(tiny, tmp_path)
    (refs / "a" / "loop").symlink_to("loop")
    _fails_cleanly(tiny, refs, tmp_path / "out", "a/loop: symbolic link loop")


def test_an_output_folder_inside_the_references_is_refused(tiny, tmp_path):
    refs = _refs_copy(tiny, tmp_path)
    out = refs / "out"
    _fails_cleanly(tiny, refs, out, "inside the reference folder")


def test_images_in_sub_sub_folders_are_labelled_by_their_top_folder_with_a_warning(tiny, tmp_path, caplog):
    refs = _refs_copy(tiny, tmp_path)
    (refs / "b" / "deeper").mkdir()
    for image in sorted((refs / "b").glob("*.png"))[:3]:
        image.rename(refs / "b" / "deeper" / image.name)
    with caplog.at_level("WARNING"):
        run_job(tiny_job_config(tiny, tmp_path / "out", ref=str(refs), n=4, guidance="none"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "3 images in sub-sub-folders (e.g. b/deeper/" in w and "class of their top-level folder (b)" in w
        for w in warnings
    )


@pytest.mark.parametrize(
    "flag, value, expect",
    [
        ("--strength", "inf", "--strength inf: not a finite number"),
        ("--strength", "1e30", "--strength 1e30: Value error, 1e+30 is far beyond any useful step"),
        ("--cfg-scale", "inf", "--cfg-scale inf: not a finite number"),
        ("--keep", "nan", "--keep nan: not a number"),
    ],
)
def test_non_finite_or_absurd_settings_are_refused_up_front(tiny, tmp_path, flag, value, expect):
    _fails_cleanly(tiny, tiny["refs"], tmp_path / "out", expect, flag, value)


class _NaNDenoiser:
    """A model whose output is NaN (as float16 on a CPU, or an overflowing guidance step, produce)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x_t, t, condition):
        out = self.inner(x_t, t, condition)
        return type(out)(sample=out.sample * float("nan"), intermediate=out.intermediate)


@pytest.mark.parametrize("guidance", ["none", "latent"])
def test_nan_latents_stop_the_run_at_the_first_batch_and_leave_nothing(tiny, tmp_path, guidance):
    from pipeline.models.loading import load_model

    model = load_model(tiny["dit"], device="cpu", dtype="float32")
    model.denoiser = _NaNDenoiser(model.denoiser)
    out = tmp_path / "out"
    cfg = tiny_job_config(tiny, out, n=8, guidance=guidance, dtype="float16")
    with pytest.raises(InputError) as info:
        run_job(cfg, model=model)
    message = str(info.value)
    assert message.startswith("samples 0..5: the sampler produced NaN or infinite latents (--dtype float16 on cpu")
    assert "use --dtype float32" in message and "\n" not in message
    assert not out.exists()  # the failed run leaves no claim: the corrected command is free to run
    assert run_job(tiny_job_config(tiny, out, n=8, guidance=guidance)).num_kept == 8


def test_a_claim_without_samples_does_not_hold_the_folder_hostage(tiny, tmp_path):
    out = tmp_path / "out"
    first = tiny_job_config(tiny, out, n=8, strength=50.0)
    claim_output(out, first.config_hash, first.hashed_fields())  # then killed (-9) before its first shard
    release_output(out)
    summary = run_job(tiny_job_config(tiny, out, n=8))
    assert summary.num_kept == 8 and summary.shards_written == 1


@pytest.mark.slow
def test_model_and_device_mistakes_get_one_line_and_exit_2(tiny, tmp_path):
    """In a fresh interpreter with HF_HUB_OFFLINE=1: a hub id is never looked up on the network."""
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    cases = {
        "./nope": ["--model", "./nope"],
        "no.such.module:fn": ["--model", "no.such.module:fn"],
        "org/missing": ["--model", "org/missing"],
        "json:dumps": ["--model", "json:dumps"],
        "--device bogus": ["--device", "bogus"],
        f"--device {device}": ["--device", device],
        "--dtype float16 on cpu": ["--device", "cpu", "--dtype", "float16"],
    }
    expect = {
        "./nope": "--model ./nope: no such folder",
        "no.such.module:fn": "--model no.such.module:fn: cannot import module 'no.such.module'",
        "org/missing": "--model org/missing: not in the local Hugging Face cache and the hub cannot be reached",
        "json:dumps": "--model json:dumps: cannot be called as factory(device=..., dtype=...)",
        "--device bogus": "--device bogus: not a device; use auto, cpu, cuda or cuda:N",
        f"--device {device}": f"--device {device}: ",
        "--dtype float16 on cpu": "--dtype float16 on cpu: float16 overflows to NaN",
    }
    base = [a for a in _cli_args(tiny, "OUT") if a not in ("--model", tiny["dit"])]
    driver = (
        "import json, sys; from typer.testing import CliRunner; from pipeline.cli import app\n"
        "cases, base, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]\n"
        "res = {}\n"
        "for name, extra in cases.items():\n"
        "    r = CliRunner().invoke(app, [a.replace('OUT', out + '/' + str(len(res))) for a in base] + extra)\n"
        "    res[name] = [r.exit_code, r.output]\n"
        "print(json.dumps(res))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(cases), json.dumps(base), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=env, check=True,
    )  # fmt: skip
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (code, output) in results.items():
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and expect[name] in errors[0], (name, output)
        assert "Traceback" not in output
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("text", ["[1, 2, 3]", "null", '"n"'])
def test_a_config_file_that_is_not_an_object_of_settings_gets_one_line(tmp_path, text):
    config = tmp_path / "job.json"
    config.write_text(text)
    result = CliRunner().invoke(app, ["--config", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: --config {config}: must hold an object of settings (names to values), not {' '.join(text.split())}"
    ]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ issue 21: what the last round left alone


def test_a_resume_is_accepted_whichever_way_the_model_folder_is_named(tiny, tmp_path, monkeypatch):
    """`--model ./dit` resumes a run made with `--model /abs/dit` (and `dit/`, `../x/dit`): one setting."""
    model = tmp_path / "models" / "dit"
    shutil.copytree(tiny["dit"], model)
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "out"

    def run(spec: str):
        args = _cli_args(tiny, out)
        args[args.index("--model") + 1] = spec
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (spec, result.output)
        return result.output

    assert "1 shard(s) written" in run(str(model))
    monkeypatch.chdir(tmp_path / "models")
    for spec in ("./dit", "dit", "dit/"):
        assert "0 shard(s) written, 1 already done" in run(spec), spec
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert "0 shard(s) written, 1 already done" in run("../models/dit")
    assert json.loads((out / "run.json").read_text())["config"]["model"] == str(model)


def test_only_a_local_model_folder_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    from pipeline.config import AugmentConfig

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    base = dict(ref="r", out="o", n=1)
    relative, absolute = AugmentConfig(**base, model="./m"), AugmentConfig(**base, model=str(tmp_path / "m"))
    assert relative.config_hash == absolute.config_hash and relative.model == str(tmp_path / "m")
    for spec in (None, "shipped", "org/name", "pkg.mod:factory", "s3://bucket/m", "./missing"):
        assert AugmentConfig(**base, model=spec).model == spec  # hub ids, import paths, URLs: as written
    assert AugmentConfig(**base).config_hash == AugmentConfig(**base, model=None).config_hash  # the shipped default


def test_workers_are_handed_ranges_of_shards_whatever_n(tiny, tmp_path, monkeypatch):
    """`launch_workers` writes a job spec of a few integers for 10^7 pending shards (n = 10^10), and
    reports the done markers of every worker's share (one cursor per worker, not a list of shards)."""
    import pipeline.jobs.executors
    from pipeline.plan import RemainingShards, ShardRanges
    from storage.shards import marker_path

    specs, counts = [], []

    class Workers:
        """Stands in for `accelerate launch`: reads the spec, then each rank writes its share's markers."""

        def __init__(self, cmd, env=None):
            self.spec = json.loads(Path(cmd[-1]).read_text())
            specs.append((len(Path(cmd[-1]).read_bytes()), self.spec))
            self.returncode, self.polls = None, 0

        def poll(self):
            self.polls += 1
            if self.polls == 1 and len(ShardRanges(self.spec["shard_ranges"])) < 100:
                cfg = self.spec["config"]
                for rank in range(cfg["processes"]):
                    for sid in ShardRanges(self.spec["shard_ranges"]).share(rank, cfg["processes"]):
                        path = marker_path(cfg["out"], cfg["prefix"], sid)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps({"count": sid + 1}))
                return None
            self.returncode = 0
            return 0

    monkeypatch.setattr(pipeline.jobs.executors.subprocess, "Popen", Workers)
    small = tiny_job_config(tiny, tmp_path / "small", n=40, shard_size=4, processes=3)
    pipeline.jobs.executors.launch_workers(small, RemainingShards(10, [0, 4, 5]), counts.append)
    huge = tiny_job_config(tiny, tmp_path / "huge", n=10**10, shard_size=1000, processes=8)
    pipeline.jobs.executors.launch_workers(huge, RemainingShards(10**7, [0, 4, 5]), counts.append)
    (small_size, small_spec), (huge_size, huge_spec) = specs
    assert small_spec["shard_ranges"] == [[1, 4], [6, 10]] and huge_spec["shard_ranges"] == [[1, 4], [6, 10**7]]
    assert huge_size - small_size < 100, (small_size, huge_size)  # a few more digits, nothing per shard
    assert sorted(counts) == [sid + 1 for sid in (1, 2, 3, 6, 7, 8, 9)]  # every marker reported, once


def test_the_static_cluster_spec_of_ten_billion_samples_is_a_few_integers(tiny, tmp_path):
    from pipeline.jobs.static_cluster import prepare

    cfg = tiny_job_config(tiny, tmp_path / "out", n=10**10, shard_size=1000, guidance="none")
    pending = prepare(cfg, tmp_path / "spec.json")
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert len(pending) == 10**7 and spec["shard_ranges"] == [[0, 10**7]]
    assert (tmp_path / "spec.json").stat().st_size < 10_000
    release_output(cfg.out)
