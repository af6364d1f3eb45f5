"""run.json and the output-folder configuration guard."""

from __future__ import annotations

import json

import pytest

from storage.errors import InputError
from storage.run_record import (
    CLAIM_FILE,
    LOCK_FILE,
    check_or_claim_output,
    claim_output,
    holds_samples,
    read_run_record,
    release_output,
    write_run_record,
)

CONFIG = {"n": 100, "seed": 0, "guidance": {"strength": 0.5, "kernel": "rbf"}, "sizes": (8, 8)}


def test_run_record_is_sorted_and_indented(tmp_path):
    path = write_run_record(tmp_path, {"z": 1, "config_hash": "h", "a": {"y": 2, "b": 3}})
    text = path.read_text()
    assert path == tmp_path / "run.json" and text.endswith("\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert read_run_record(tmp_path)["a"] == {"b": 3, "y": 2}
    assert read_run_record(tmp_path / "none") is None
    with pytest.raises(ValueError, match="config_hash"):
        write_run_record(tmp_path, {"config": {}})


def test_fresh_folder_is_claimed_then_resumed(tmp_path):
    out = tmp_path / "nested" / "out"
    assert check_or_claim_output(out, "h1", CONFIG) is False
    assert (out / CLAIM_FILE).exists() and json.loads((out / CLAIM_FILE).read_text())["config_hash"] == "h1"
    assert check_or_claim_output(out, "h1", CONFIG) is True
    write_run_record(out, {"config_hash": "h1", "config": CONFIG})
    assert check_or_claim_output(out, "h1", CONFIG) is True
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []


def test_different_config_is_refused_with_the_differences(tmp_path):
    check_or_claim_output(tmp_path, "h1", CONFIG)
    changed = {**CONFIG, "seed": 1, "guidance": {"strength": 1.0, "kernel": "rbf"}, "new": True}
    with pytest.raises(InputError) as info:
        check_or_claim_output(tmp_path, "h2", changed)
    message = str(info.value)
    assert str(tmp_path) in message and "different configuration" in message and "--out" in message
    assert "guidance.strength: 0.5 -> 1.0" in message and "new: (absent) -> true" in message
    assert "seed: 0 -> 1" in message and "\n" not in message


def test_differences_list_the_new_config_keys_first(tmp_path):
    write_run_record(tmp_path, {"config_hash": "h1", "config": {**CONFIG, "device": "cpu", "cache_dir": None}})
    with pytest.raises(InputError, match=r"differs in n: 100 -> 5; cache_dir: null -> \(absent\)"):
        check_or_claim_output(tmp_path, "h2", {**CONFIG, "n": 5})


def test_run_json_alone_guards_too(tmp_path):
    write_run_record(tmp_path, {"config_hash": "h1", "config": CONFIG})
    assert check_or_claim_output(tmp_path, "h1", CONFIG) is True
    with pytest.raises(InputError, match="different configuration"):
        check_or_claim_output(tmp_path, "h2", {**CONFIG, "n": 5})
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(InputError, match=r"run\.json: unreadable"):
        check_or_claim_output(tmp_path, "h1", CONFIG)


def test_foreign_folders_are_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="not empty"):
        check_or_claim_output(tmp_path, "h1", CONFIG)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_or_claim_output(tmp_path / "file", "h1", CONFIG)
    hidden_only = tmp_path / "h"
    hidden_only.mkdir()
    (hidden_only / ".DS_Store").write_bytes(b"x")
    assert check_or_claim_output(hidden_only, "h1", CONFIG) is False


# ------------------------------------------------------------------ claim_output: writable, locked, not hostage


def test_a_second_run_into_a_locked_folder_is_refused_until_the_first_ends(tmp_path, hold_output_lock):
    out = tmp_path / "out"
    holder = hold_output_lock(out)
    with pytest.raises(InputError) as info:
        claim_output(out, "h1", {"n": 1})
    message = str(info.value)
    assert "another run is writing to this folder" in message and f"pid {holder.pid}" in message
    assert "--out" in message and "\n" not in message
    holder.kill()  # like kill -9: the OS releases the lock
    holder.wait()
    assert claim_output(out, "h1", {"n": 1}) is True
    assert claim_output(out, "h1", {"n": 1}) is True  # this process already holds it
    release_output(out)


def test_a_folder_claimed_by_a_run_that_wrote_no_sample_is_free_for_another_config(tmp_path):
    out = tmp_path / "out"
    assert claim_output(out, "h1", CONFIG) is False  # e.g. a run that then failed on NaN at its first batch
    release_output(out)
    (out / "shards" / "synthetic-000000.tar.tmp-999999-abcd").write_bytes(b"partial")  # crashed writer: not a sample
    assert claim_output(out, "h2", {**CONFIG, "n": 5}) is False
    release_output(out)
    assert json.loads((out / CLAIM_FILE).read_text())["config_hash"] == "h2"
    (out / "shards" / "synthetic-000000.tar").write_bytes(b"a sample")
    assert holds_samples(out)
    with pytest.raises(InputError, match="different configuration"):
        claim_output(out, "h3", {**CONFIG, "n": 6})
    assert check_or_claim_output(tmp_path / "plain", "h1", CONFIG) is False
    with pytest.raises(InputError, match="different configuration"):  # the guard alone never re-claims
        check_or_claim_output(tmp_path / "plain", "h2", {})


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_else(tmp_path, unprivileged):
    top, drop = unprivileged
    locked = top / "read-only"
    locked.mkdir(mode=0o555)
    for out in (locked / "out", locked):
        with drop(), pytest.raises(InputError, match=r"cannot write here \(Permission denied\)") as info:
            claim_output(out, "h1", CONFIG)
        assert "--out" in str(info.value)
    assert list(locked.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match="cannot write here"):
        claim_output(tmp_path / "a-file" / "out", "h1", CONFIG)


def test_a_run_starting_into_a_folder_another_run_is_still_claiming_is_told_so(tmp_path, hold_output_lock):
    out = tmp_path / "out"
    holder = hold_output_lock(out)
    (out / CLAIM_FILE).unlink()  # the other run has its lock and probe folders, not yet its claim
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "manifest", "shards"]
    with pytest.raises(InputError, match="another run is writing to this folder"):
        claim_output(out, "h2", CONFIG)
    holder.kill()
    holder.wait()
    assert claim_output(out, "h2", CONFIG) is False  # what an interrupted claim leaves is not foreign
    release_output(out)


def test_inputs_are_recorded_then_checked(tmp_path):
    from storage.run_record import INPUTS_FILE, check_or_record_inputs

    inputs = {"reference_content_hash": "c1", "model_id": "m"}
    check_or_record_inputs(tmp_path, inputs)
    assert json.loads((tmp_path / INPUTS_FILE).read_text()) == inputs
    check_or_record_inputs(tmp_path, {**inputs, "model_id": "m2"})  # no samples yet: new inputs are recorded
    assert json.loads((tmp_path / INPUTS_FILE).read_text())["model_id"] == "m2"
    check_or_record_inputs(tmp_path, inputs)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "synthetic-000000.tar").write_bytes(b"a sample")  # from now on the inputs are fixed
    check_or_record_inputs(tmp_path, dict(inputs))  # the same inputs resume
    with pytest.raises(InputError, match=r"other inputs \(reference_content_hash: c1 -> c2\)"):
        check_or_record_inputs(tmp_path, {**inputs, "reference_content_hash": "c2"})
    (tmp_path / INPUTS_FILE).write_text("[1, 2")
    with pytest.raises(InputError, match="unreadable"):
        check_or_record_inputs(tmp_path, inputs)


def test_job_spec_round_trip_and_bad_specs(tmp_path):
    from storage.run_record import read_job_spec, write_job_spec

    path = write_job_spec(tmp_path / "spec.json", {"n": 4}, [(3, 4), (5, 9)], prepared_at=1.5)
    assert read_job_spec(path) == {"config": {"n": 4}, "shard_ranges": [[3, 4], [5, 9]], "prepared_at": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]  # no temporary file left
    with pytest.raises(InputError, match="no such job spec"):
        read_job_spec(tmp_path / "missing.json")
    for name, text in [("other", '{"config": {}}'), ("old", '{"config": {}, "shards": [3, 5]}')]:
        (tmp_path / f"{name}.json").write_text(text)
        with pytest.raises(InputError, match="not a job spec of this version"):
            read_job_spec(tmp_path / f"{name}.json")
    (tmp_path / "bad.json").write_text('{"config": {}, "shard_ranges": [[3]]}')
    with pytest.raises(InputError, match="not a job spec"):
        read_job_spec(tmp_path / "bad.json")
