"""Issue 21: the exit code says what was delivered. 0: --n samples kept; 2: bad input or settings; 3: the run
finished short (fewer than --n kept), after writing what it kept, the manifest and run.json; --allow-shortfall
accepts a short run (exit 0, still a warning). The codes are documented in `augment --help` and the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny_models import save_tiny_dit, short_run_settings, tiny_job_config, write_reference_folder
from typer.testing import CliRunner

from flows.cli import app
from pipeline.cli import EXIT_CODES, EXIT_FINISHED_SHORT
from pipeline.cli.options import flag
from storage.run_record import write_job_spec

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-exit-codes")
    tiny = {
        "dit": str(save_tiny_dit(root / "dit")),
        "refs": str(write_reference_folder(root / "refs", classes=("a", "b"))),
        "cache": str(root / "cache"),
    }
    tiny["short"] = short_run_settings(tiny, root / "probe", kept=3)
    return tiny


def job_args(tiny, out: Path, **settings) -> list[str]:
    """`augment` flags of `tiny_job_config(tiny, out, **settings)` (every setting it makes, as typed)."""
    cfg = tiny_job_config(tiny, out, **settings)
    args = []
    for name in ("ref", "out", "n", "model", "cache_dir", "shard_size", "batch_size", "steps", "keep", "progress"):
        args += [flag(name), str(getattr(cfg, name))]
    for name, value in settings.items():
        args += [flag(name), str(value)]
    if "support_radius" not in settings:
        args += [flag("support_radius"), str(cfg.support_radius)]
    return args


def test_a_run_that_finishes_short_exits_3_after_writing_and_a_rerun_says_the_same(tiny, tmp_path, caplog):
    out = tmp_path / "out"
    args = job_args(tiny, out, **tiny["short"])
    first = CliRunner().invoke(app, args)
    assert first.exit_code == EXIT_FINISHED_SHORT == 3, (first.output, first.exception)
    # the summary first, then one error line that says what was written and what to do
    assert "kept 3 of 8 samples" in first.output
    error = [line for line in first.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "finished short: kept 3 of --n 8 samples (5 short" in error[0]
    assert "5 outside support" in error[0] and "--allow-shortfall" in error[0]
    # what it kept is delivered: shards, manifest and run.json (with the shortfall in its summary)
    record = json.loads((out / "run.json").read_text())
    assert record["summary"]["shortfall"] == 5 and record["summary"]["num_kept"] == 3
    assert (out / "manifest.parquet").is_file() and list((out / "shards").glob("*.tar"))

    again = CliRunner().invoke(app, args)  # a resume of the finished-short job: nothing to do, same verdict
    assert again.exit_code == 3, again.output
    assert "0 shard(s) written, 1 already done" in again.output
    assert [line for line in again.output.splitlines() if line.startswith("error: ")] == error

    caplog.clear()
    with caplog.at_level("WARNING"):
        accepted = CliRunner().invoke(app, [*args, "--allow-shortfall"])  # a runtime setting: the same folder
    assert accepted.exit_code == 0, accepted.output
    assert "kept 3 of 8 samples" in accepted.output and "error:" not in accepted.output
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("kept 3 samples, 5 fewer than --n 8" in w for w in warnings), warnings


def test_a_short_run_under_progress_json_ends_with_an_error_event_that_carries_the_code(tiny, tmp_path):
    out = tmp_path / "out"
    args = [a if a != "quiet" else "json" for a in job_args(tiny, out, **tiny["short"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    event = json.loads(result.output.strip().splitlines()[-1])
    assert event["event"] == "error" and event["exit_code"] == 3 and "finished short" in event["message"]


def test_a_run_that_keeps_every_sample_exits_0(tiny, tmp_path):
    result = CliRunner().invoke(app, job_args(tiny, tmp_path / "out", n=4, shard_size=4, guidance="none"))
    assert result.exit_code == 0, result.output
    assert "kept 4 of" in result.output and "error:" not in result.output


def test_static_cluster_finish_exits_3_on_a_short_run(tiny, tmp_path, capsys):
    """`python -m pipeline.jobs.static_cluster finish` gives the same verdict as `augment`."""
    from pipeline.jobs.static_cluster import main

    out = tmp_path / "out"
    cfg = tiny_job_config(tiny, out, **tiny["short"])
    assert CliRunner().invoke(app, job_args(tiny, out, **tiny["short"])).exit_code == 3  # every shard done
    spec = write_job_spec(tmp_path / "spec.json", cfg.model_dump(mode="json"), [])
    assert main(["finish", "--spec", str(spec)]) == 3
    assert "finished short: kept 3 of --n 8" in capsys.readouterr().err
    allowed = cfg.model_copy(update={"allow_shortfall": True})
    spec = write_job_spec(tmp_path / "allowed.json", allowed.model_dump(mode="json"), [])
    assert main(["finish", "--spec", str(spec)]) == 0


@pytest.mark.parametrize("error, code", [(RuntimeError("worker processes failed"), 1), (KeyboardInterrupt(), 130)])
def test_a_failure_and_an_interrupt_have_their_documented_codes(tiny, tmp_path, monkeypatch, error, code):
    import pipeline.jobs.job

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline.jobs.job, "run_job", fails)
    result = CliRunner().invoke(app, job_args(tiny, tmp_path / "out", n=4, guidance="none"))
    assert result.exit_code == code and code in EXIT_CODES, result.output


def test_exit_codes_are_in_the_help_and_in_the_readme():
    for command in ([], ["flow"]):
        text = CliRunner().invoke(app, [*command, "--help"]).output
        assert "Exit codes:" in text, command
        for code, meaning in EXIT_CODES.items():
            assert re.search(rf"^\s+{code}\s+{re.escape(meaning)}$", text, re.M), (command, code)
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Exit codes") :]
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", table, re.M))
    assert set(map(int, rows)) >= set(EXIT_CODES), rows  # every code of `augment`, the training CLI's 130 too
    assert "--interrupt" in rows["130"] and "allow-shortfall" in rows["0"] and "finished short" in rows["3"]
