"""Prefect flows under the test harness (one ephemeral server for the module), offline, on a tiny DiT.

Covered: the reference cache hit across runs, a shard task that fails once and succeeds on retry
(skipping the shard it had finished), a re-run that skips done shards, byte-identical output from the
flow, from `augment flow` and from `pipeline.jobs.job.run_job`, and the fan-out parent flow under a
global concurrency limit (node runs executed in-process instead of through a worker); issue 21: a flow
that finishes short ends Failed after writing (exit 3 from `augment flow`), a flow that fails mid-run
gives its output folder back, and shard tasks are handed ranges, not lists of every shard.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_models import (
    TINY_SUPPORT_RADIUS,
    save_tiny_dit,
    shard_bytes,
    short_run_settings,
    tiny_job_config,
    write_reference_folder,
)
from typer.testing import CliRunner

import pipeline.jobs.executors
from pipeline.config import AugmentConfig
from pipeline.jobs.job import run_job

prefect = pytest.importorskip("prefect")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

from flows import augment_flow, fanout  # noqa: E402
from flows.augment_flow import augment  # noqa: E402


@pytest.fixture(scope="module")
def harness():
    """One ephemeral Prefect server (SQLite in a temp dir) for all tests here: it takes 10-15 s to start."""
    from prefect.settings import (
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    quiet = {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore",  # tasks called outside a flow (cache test)
    }
    with temporary_settings(quiet):
        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flows")
    return {
        "root": root,
        "dit": str(save_tiny_dit(root / "dit")),
        "refs": str(write_reference_folder(root / "refs", classes=("a", "b"))),
        "cache": str(root / "cache"),
    }


@pytest.fixture(scope="module")
def reference_run(tiny):
    """The plain job (`pipeline.jobs.job.run_job`, what the CLI runs): the bytes every flow must reproduce."""
    out = tiny["root"] / "plain"
    run_job(tiny_job_config(tiny, out))
    return {"shards": shard_bytes(out), "manifest": (out / "manifest.parquet").read_bytes()}


@pytest.fixture(scope="module")
def cli_flow_run(harness, tiny):
    """`augment ... flow`: the CLI's config, run as a Prefect flow."""
    from flows.cli import app  # the `augment` entry point's app

    out = tiny["root"] / "via-cli"
    args = ["--ref", tiny["refs"], "--n", "20", "--out", str(out), "--model", tiny["dit"], "--cache-dir", tiny["cache"]]
    args += ["--shard-size", "8", "--batch-size", "6", "--steps", "4", "--keep", "0.8", "--progress", "quiet"]
    settings = tiny["root"] / "tiny-support.json"  # what tiny_job_config sets and the CLI has no flag for
    settings.write_text(json.dumps({"support_radius": TINY_SUPPORT_RADIUS}))
    args += ["--config", str(settings)]
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["flow", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return {"out": out, "output": result.output, "seconds": time.perf_counter() - t0}


def test_flow_subcommand_builds_the_clis_config_whatever_the_option_order(tiny, tmp_path, monkeypatch):
    import flows.cli
    from pipeline import cli as base

    seen = []
    monkeypatch.setattr(flows.cli, "run_flow", lambda cfg, **kw: seen.append((cfg, kw)))
    app = flows.cli.make_app()
    opts = ["--ref", tiny["refs"], "--n", "20", "--out", str(tmp_path), "--steps", "4", "--strength", "0.2"]
    for args in (["flow", *opts, "--shards-per-task", "2"], [*opts, "flow", "--shards-per-task", "2"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (result.output, result.exception)
    expected = base.build_config(
        None, {"ref": tiny["refs"], "n": 20, "out": str(tmp_path), "steps": 4, "strength": 0.2}
    )
    assert [cfg for cfg, _ in seen] == [expected, expected]
    assert all(kw == {"shards_per_task": 2, "per_run_output": False} for _, kw in seen)
    assert CliRunner().invoke(app, ["flow", "--n", "0", "--ref", "r", "--out", "o"]).exit_code == 2  # validated


def test_precompute_reference_is_cached_on_content_and_model(harness, tiny, tmp_path, monkeypatch):
    calls = []
    real = augment_flow.encode_references
    monkeypatch.setattr(augment_flow, "encode_references", lambda cfg: calls.append(cfg.ref) or real(cfg))
    cfg = tiny_job_config(tiny, tmp_path / "a", cache_dir=str(tmp_path / "cache"))
    task = augment_flow.reference_task(cfg)

    first = task(cfg.model_dump(mode="json"), return_state=True)
    second = task(cfg.model_dump(mode="json"), return_state=True)
    assert len(calls) == 1 and second.name == "Cached"
    info = first.result()
    assert second.result() == info
    assert info["count"] == 24 and Path(info["bundle_dir"], "bundle.safetensors").is_file()
    assert info["model_id"].startswith("dit@")

    # settings that do not change the bundle (output, guidance, steps) hit the same cache entry
    other = tiny_job_config(tiny, tmp_path / "b", cache_dir=str(tmp_path / "cache"), strength=0.5, steps=2)
    assert augment_flow.reference_task(other)(other.model_dump(mode="json"), return_state=True).name == "Cached"
    assert len(calls) == 1

    # changed reference bytes: a miss, the body runs again
    refs = Path(shutil.copytree(tiny["refs"], tmp_path / "refs2"))
    victim = sorted(refs.rglob("*.png"))[0]
    victim.write_bytes((refs / "b" / "img_001.png").read_bytes())
    changed = tiny_job_config(tiny, tmp_path / "c", ref=str(refs), cache_dir=str(tmp_path / "cache"))
    state = augment_flow.reference_task(changed)(changed.model_dump(mode="json"), return_state=True)
    assert state.name != "Cached" and len(calls) == 2
    assert state.result()["content_hash"] != info["content_hash"]
    # the cache record lives under the reference cache dir, next to the bundles
    assert any((tmp_path / "cache" / augment_flow.RESULTS_SUBDIR).iterdir())


def test_cli_flow_gives_the_same_bytes_as_the_plain_job(cli_flow_run, reference_run):
    out = cli_flow_run["out"]
    assert "kept 20 of 25 samples" in cli_flow_run["output"] and "Prefect flow run" in cli_flow_run["output"]
    assert shard_bytes(out) == reference_run["shards"]
    assert (out / "manifest.parquet").read_bytes() == reference_run["manifest"]


def test_flow_rerun_skips_done_shards_and_publishes_a_summary(harness, tiny, cli_flow_run, reference_run):
    out = cli_flow_run["out"]
    cfg = tiny_job_config(tiny, out)
    # lose one shard (as after a crash): the re-run redoes exactly that one
    (out / "shards" / "synthetic-000001.tar.done").unlink()
    state = augment(config=cfg, return_state=True)
    result = state.result()
    assert result["shards_written"] == 1 and result["shards_skipped"] == 2
    assert result["num_kept"] == 20 and result["reference_cached"] is True
    assert shard_bytes(out) == reference_run["shards"]
    assert (out / "manifest.parquet").read_bytes() == reference_run["manifest"]
    # nothing left to do: no shard task at all
    again = augment(config=cfg)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert sorted(t.name for t in task_runs if t.name.startswith("shards-")) == ["shards-000001-000001"]
    table = next(a for a in artifacts if a.type == "table")
    assert table.key == f"augment-{cfg.config_hash}"
    metrics = {row["metric"]: row["value"] for row in json.loads(table.data)}
    assert metrics["samples kept / generated"] == "20 / 25" and float(metrics["MMD² kept (after filter)"]) >= 0
    assert any(a.type == "markdown" and "augment run summary" in str(a.data) for a in artifacts)


def test_shard_task_failing_once_is_retried_and_skips_what_it_finished(
    harness, tiny, tmp_path, monkeypatch, reference_run
):
    calls: list[int] = []
    real = pipeline.jobs.executors.run_shard

    def flaky(ctx, shard, progress=None):
        calls.append(shard.shard_id)
        if shard.shard_id == 1 and calls.count(1) == 1:
            raise RuntimeError("transient: lost the GPU")
        return real(ctx, shard, progress)

    monkeypatch.setattr(pipeline.jobs.executors, "run_shard", flaky)
    no_wait = augment_flow.run_shard_range.with_options(retry_delay_seconds=0)
    monkeypatch.setattr(augment_flow, "run_shard_range", no_wait)
    out = tmp_path / "flaky"
    state = augment(config=tiny_job_config(tiny, out), shards_per_task=2, return_state=True)
    assert state.is_completed(), state
    assert calls == [0, 1, 1, 2]  # the retry skipped shard 0 (done marker), redid shard 1
    assert shard_bytes(out) == reference_run["shards"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    by_name = {t.name: t for t in runs}
    assert by_name["shards-000000-000001"].run_count == 2 and by_name["shards-000002-000002"].run_count == 1


@pytest.mark.slow
def test_flow_with_accelerate_workers_and_a_per_run_folder(harness, tiny, tmp_path, reference_run):
    """processes=2: the shard task launches 2 accelerate workers (gloo on CPU); same bytes."""
    out = tmp_path / "k2"
    result = augment(config=tiny_job_config(tiny, out, processes=2), per_run_output=True)
    (run_folder,) = list(out.iterdir())
    assert result["out"] == str(run_folder) and re.fullmatch(r"\d{8}T\d{4}Z", run_folder.name)
    assert shard_bytes(run_folder) == reference_run["shards"]
    workers = {json.loads(p.read_text())["worker"] for p in (run_folder / "shards").glob("*.done")}
    assert workers == {"rank0", "rank1"}


def test_flow_with_a_text_to_image_model_gives_the_plain_jobs_bytes_and_prompts(harness, tiny, tmp_path):
    from tiny_families import save_tiny_pipeline

    model = str(save_tiny_pipeline("sd1", tiny["root"] / "sd1"))
    settings = dict(model=model, prompt="a red square", resolution=16, reach_check=False, strength=0.1, n=12)
    run_job(tiny_job_config(tiny, tmp_path / "plain", **settings))
    result = augment(config=tiny_job_config(tiny, tmp_path / "flow", **settings))
    assert result["num_kept"] == 12
    assert shard_bytes(tmp_path / "flow") == shard_bytes(tmp_path / "plain")
    manifest = (tmp_path / "flow" / "manifest.parquet").read_bytes()
    assert manifest == (tmp_path / "plain" / "manifest.parquet").read_bytes()
    import pyarrow.parquet as pq

    assert set(pq.read_table(tmp_path / "flow" / "manifest.parquet")["prompt"].to_pylist()) == {"a red square"}


def test_shard_task_retry_policy_is_exponential_backoff():
    task = augment_flow.run_shard_range
    assert task.retries == augment_flow.SHARD_RETRIES >= 2
    delays = list(task.retry_delay_seconds)
    assert delays == sorted(delays) and delays[1] == 2 * delays[0] > 0
    assert task.retry_jitter_factor


def test_fanout_caps_concurrent_node_runs_and_finishes_the_job(harness, tiny, tmp_path, monkeypatch, reference_run):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    limit = "mmd-augment-nodes-test"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    running, peak, started = [0], [0], []
    lock = threading.Lock()

    def fake_run_deployment(name, parameters, timeout=None, tags=None, **kw):
        """Stands in for a worker picking the node run up: the node flow, in this process."""
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started.append((name, parameters["shard_ranges"], tags))
        try:
            state = fanout.augment_node(
                config=AugmentConfig.model_validate(parameters["config"]),
                shard_ranges=parameters["shard_ranges"],
                return_state=True,
            )
        finally:
            with lock:
                running[0] -= 1
        return SimpleNamespace(state=state, name="fake-node-run", id=None)

    monkeypatch.setattr(fanout, "run_deployment", fake_run_deployment)
    out = tmp_path / "fanout"
    result = fanout.augment_fanout(
        config=tiny_job_config(tiny, out),
        node_deployment="augment-node/test",
        shards_per_node=1,
        concurrency_limit=limit,
    )
    assert result["node_runs"] == 3 and result["num_kept"] == 20
    assert peak[0] == 1  # the limit of 1 serialised the three node runs
    assert sorted(ranges for _, ranges, _ in started) == [[[0, 1]], [[1, 2]], [[2, 3]]]  # ranges, not id lists
    assert all(name == "augment-node/test" and tags == [fanout.NODE_TAG] for name, _, tags in started)
    assert shard_bytes(out) == reference_run["shards"]


def test_bad_references_fail_the_flow_at_once_without_retries_or_output(harness, tiny, tmp_path):
    out = tmp_path / "out"
    state = augment(config=tiny_job_config(tiny, out, ref=str(tmp_path / "missing")), return_state=True)
    assert state.is_failed() and "missing" in str(state.message) + repr(state.result(raise_on_failure=False))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert [(t.name.split("-")[0], t.run_count) for t in runs] == [("precompute", 1)]  # no retry of bad input
    assert not out.exists()


def test_node_run_refuses_an_unclaimed_output_folder(harness, tiny, tmp_path):
    state = fanout.augment_node(
        config=tiny_job_config(tiny, tmp_path / "nowhere"), shard_ranges=[[0, 1]], return_state=True
    )
    assert state.is_failed()
    assert not (tmp_path / "nowhere" / "shards").exists()


@pytest.mark.slow
def test_a_flow_that_finishes_short_ends_failed_after_writing_unless_allowed(harness, tiny, tmp_path):
    """Issue 21: kept fewer than --n -> the flow run writes what it kept, run.json and its artifact, then
    ends Failed (`FinishedShort`); `augment flow` exits 3; allow_shortfall completes it."""
    from pipeline.jobs.summary import FinishedShort

    short = short_run_settings(tiny, tmp_path / "probe", kept=3)
    out = tmp_path / "short"
    state = augment(config=tiny_job_config(tiny, out, **short), return_state=True)
    assert state.is_failed()
    with pytest.raises(FinishedShort, match="finished short: kept 3 of --n 8 samples"):
        state.result()
    assert json.loads((out / "run.json").read_text())["summary"]["shortfall"] == 5
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    table = next(a for a in artifacts if a.type == "table")
    metrics = {row["metric"]: row["value"] for row in json.loads(table.data)}
    assert metrics["samples kept / generated"] == "3 / 8" and metrics["samples short of --n"] == "5"

    from flows.cli import app

    settings = tmp_path / "short.json"
    settings.write_text(json.dumps({k: v for k, v in short.items() if k != "n"}))
    args = ["--ref", tiny["refs"], "--n", "8", "--out", str(out), "--model", tiny["dit"], "--cache-dir", tiny["cache"]]
    args += ["--batch-size", "6", "--steps", "4", "--progress", "quiet", "--config", str(settings)]
    result = CliRunner().invoke(app, ["flow", *args])  # a re-run of the finished-short job: the same verdict
    assert result.exit_code == 3, (result.output, result.exception)
    assert "kept 3 of 8 samples" in result.output and "error: " in result.output
    allowed = augment(config=tiny_job_config(tiny, out, **short, allow_shortfall=True), return_state=True)
    assert allowed.is_completed() and allowed.result()["shortfall"] == 5


@pytest.mark.slow
def test_a_flow_that_fails_mid_run_gives_the_folder_back_for_a_corrected_rerun(harness, tiny, tmp_path, monkeypatch):
    """A failure between the job's start and its finish (a shard task failing for good) releases the
    output folder's lock and, as nothing was written, its claim: the corrected settings then run there
    from another process (the CLI), as after a failed CLI run."""
    import os
    import subprocess
    import sys

    def broken(ctx, shard, progress=None):
        raise RuntimeError("injected: the node lost its GPU")

    monkeypatch.setattr(pipeline.jobs.executors, "run_shard", broken)
    monkeypatch.setattr(augment_flow, "run_shard_range", augment_flow.run_shard_range.with_options(retries=0))
    out = tmp_path / "out"
    state = augment(config=tiny_job_config(tiny, out, n=4, shard_size=4, strength=0.5), return_state=True)
    assert state.is_failed() and "injected" in str(state.result(raise_on_failure=False))
    assert not out.exists() or not any(out.iterdir())  # no claim, no records left behind

    corrected = ["--ref", tiny["refs"], "--n", "4", "--out", str(out), "--model", tiny["dit"], "--steps", "4"]
    corrected += ["--shard-size", "4", "--strength", "0.01", "--cache-dir", tiny["cache"], "--progress", "quiet"]
    corrected += ["--support-radius", str(TINY_SUPPORT_RADIUS)]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *corrected], cwd=repo, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "kept 4 of" in rerun.stdout


def test_shard_tasks_are_handed_ranges_whose_size_does_not_grow_with_n():
    """All pending shards of a 10^10-sample job in one task (K workers): its parameter is two ranges; a
    small job split into tasks of 2 gets the same shards as before, each once."""
    from pipeline.plan import RemainingShards, plan_job

    huge = AugmentConfig(ref="r", out="o", n=10**10, processes=8)
    pending = RemainingShards(len(plan_job(huge).shards), [0, 4, 5])
    (only,) = augment_flow.split_ranges(pending, augment_flow.default_shards_per_task(huge, pending))
    assert only.to_json() == [[1, 4], [6, 10**7]]
    small = RemainingShards(10, [0, 4, 5])
    parts = augment_flow.split_ranges(small, 2)
    assert [list(p) for p in parts] == [[1, 2], [3, 6], [7, 8], [9]]
    assert [p.to_json() for p in parts][1] == [[3, 4], [6, 7]]
