"""`run.json` and the guards of an output folder: one configuration per folder, one run at a time.

`claim_output` runs before anything else is written to `--out` and before any generation:

- the folder must be writable (checked by writing, in the folder and in `shards/` and `manifest/`);
- one run at a time: the run holds `OUT/.augment.lock` (an OS file lock, released when the process exits,
  even by `kill -9`) from its start to its end; a second run into the same folder is refused with a
  message that names the holder's pid and host;
- one configuration per folder: a fresh folder is claimed (`.config-claim.json` holds the config hash
  and config); the same configuration resumes; a different one is refused with a message that names the
  first differing keys, unless the folder holds no samples yet (a run that failed before writing a
  shard does not hold its folder hostage): then the new configuration claims it.

`check_or_claim_output` is the configuration guard alone (no lock, never re-claims): for processes that
join a run another process started and holds.

`check_or_record_inputs` does the same for what the settings do not name: the references' content and
the model (`.inputs.json`). The job spec (`write_job_spec`/`read_job_spec`) is what
`accelerate launch -m pipeline.distributed SPEC` reads on every machine: the config and the shard ids
(as ranges).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from storage.atomic import TMP_MARK, atomic_write_json, dumps_json, tmp_name
from storage.errors import InputError

__all__ = [
    "CLAIM_FILE",
    "INPUTS_FILE",
    "LOCK_FILE",
    "RUN_FILE",
    "abandon_output",
    "check_claimable",
    "check_or_claim_output",
    "check_or_record_inputs",
    "claim_output",
    "discard_samples",
    "holds_samples",
    "read_job_spec",
    "read_run_record",
    "release_output",
    "write_job_spec",
    "write_run_record",
]

RUN_FILE = "run.json"
CLAIM_FILE = ".config-claim.json"
LOCK_FILE = ".augment.lock"
#: Folders whose files are samples (or their records) of a run; `holds_samples` looks in them.
_WORK_DIRS = ("shards", "manifest", "rejected")
#: Records which references and model a folder's samples were made from (guards resumption).
INPUTS_FILE = ".inputs.json"
_SHOWN_DIFFS = 3
#: The output locks this process holds, by resolved folder (a process takes each folder's lock once).
_HELD: dict[str, FileLock] = {}
#: Folders that this process's `claim_output` created (so `abandon_output` may remove them again).
_CREATED: set[str] = set()


def write_run_record(out_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write `out_dir/run.json` atomically (sorted keys, indented).

    The record should hold at least `config_hash` and `config` (the guard reads them), plus versions
    and the reference content hash.
    """
    if "config_hash" not in record:
        raise ValueError("run record needs a 'config_hash'")
    return atomic_write_json(Path(out_dir) / RUN_FILE, record)


def read_run_record(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """`out_dir/run.json` as a dict, or None if it does not exist."""
    path = Path(out_dir) / RUN_FILE
    if not path.exists():
        return None
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e}); delete it or choose another --out") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object; delete it or choose another --out")
    return data


def claim_output(out_dir: str | os.PathLike[str], config_hash: str, config: dict[str, Any]) -> bool:
    """Check that `out_dir` can be written, take its lock for this process, and claim it for this
    configuration (or confirm that it holds the same one). Call `release_output` when the run ends.

    Nothing is written to a folder that is refused for what it holds.

    Returns:
        True if the folder holds a run with the same `config_hash` (resume), False if it was fresh (or
        held no samples) and is now claimed.

    Raises:
        InputError: the folder cannot be created or written; another process is running into it; it
            holds samples of another configuration; it is not empty and holds no run of this tool; it
            is a file.
    """
    out = Path(out_dir)
    if not (out / LOCK_FILE).exists():  # a folder with a lock is this tool's: the lock will tell who holds it
        _refuse_foreign(out)
    created = not out.exists()
    _make_writable_folders(out, ())
    if created:
        _CREATED.add(_lock_key(out))
    _lock(out)
    try:
        _refuse_foreign(out)  # again, under the lock: nothing can appear in between now
        _make_writable_folders(out, ("shards", "manifest"))
        return _check_or_claim(out, config_hash, config, may_reclaim=True)
    except BaseException:
        release_output(out)
        raise


def release_output(out_dir: str | os.PathLike[str]) -> None:
    """Release this process's lock on `out_dir` (a no-op if it holds none)."""
    lock = _HELD.pop(_lock_key(Path(out_dir)), None)
    if lock is not None:
        lock.release(force=True)


def abandon_output(out_dir: str | os.PathLike[str], *, records: tuple[str, ...] = ()) -> bool:
    """After a run failed: if `out_dir` holds no samples, undo this process's claim so the failed run
    leaves nothing behind (the claim, the run's `records` such as `.inputs.json`, empty `shards/`,
    `manifest/` and `rejected/`, the lock, and the folder itself if the claim created it and it is now
    empty). Releases the lock either way.

    Returns:
        True if the claim was undone; False if the folder holds samples (kept as they are) or this
        process holds no claim on it.
    """
    out = Path(out_dir)
    key = _lock_key(out)
    try:
        if key not in _HELD or holds_samples(out):
            return False
        for name in (CLAIM_FILE, *records):
            (out / name).unlink(missing_ok=True)
        for name in _WORK_DIRS:
            with contextlib.suppress(OSError):
                (out / name).rmdir()  # only if empty
        (out / LOCK_FILE).unlink(missing_ok=True)
        if key in _CREATED:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty
        return True
    finally:
        release_output(out)
        _CREATED.discard(key)


def discard_samples(out_dir: str | os.PathLike[str]) -> None:
    """Remove every shard, manifest part, rejected shard and the merged manifest from `out_dir`: for a run
    that kept no sample at all, so that the folder takes corrected settings (then `abandon_output`)."""
    out = Path(out_dir)
    for name in _WORK_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "manifest.parquet").unlink(missing_ok=True)


def holds_samples(out_dir: str | os.PathLike[str]) -> bool:
    """Whether `out_dir` holds any output of a run: `run.json`, `manifest.parquet`, or a file in
    `shards/`, `manifest/` or `rejected/` (temporary files of crashed writers do not count)."""
    out = Path(out_dir)
    if (out / RUN_FILE).exists() or (out / "manifest.parquet").exists():
        return True
    for name in _WORK_DIRS:
        try:
            with os.scandir(out / name) as entries:
                if any(TMP_MARK not in e.name and not e.name.startswith(".") for e in entries):
                    return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False


def check_or_claim_output(out_dir: str | os.PathLike[str], config_hash: str, config: dict[str, Any]) -> bool:
    """Claim `out_dir` for this configuration, or confirm it already holds the same one.

    The configuration guard alone: no lock, and a folder claimed by another configuration is refused
    even when it holds no samples (see `claim_output`). Creates the folder if needed.

    Returns:
        True if the folder holds a run with the same `config_hash` (resume), False if it was fresh
        and is now claimed.

    Raises:
        InputError: the folder holds a run with another configuration, or is not empty and holds no
            run at all (files other than hidden ones), or is a file.
    """
    out = Path(out_dir)
    _refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    return _check_or_claim(out, config_hash, config, may_reclaim=False)


def check_claimable(out_dir: str | os.PathLike[str], config_hash: str, config: dict[str, Any]) -> None:
    """Raise InputError where `claim_output` would refuse, writing nothing: a file, an unreadable or foreign
    folder, a folder holding samples of another configuration, a folder another run is writing to now."""
    out = Path(out_dir)
    _refuse_foreign(out)
    if not out.is_dir():
        return
    if (out / LOCK_FILE).exists() and _lock_key(out) not in _HELD:
        probe = FileLock(out / LOCK_FILE, timeout=0, thread_local=False, fallback_to_soft=False)
        try:
            probe.acquire()
        except Timeout:
            raise InputError(
                f"{out}: another run is writing to this folder ({_describe_holder(out / LOCK_FILE)}); wait for it "
                "to finish (rerun then to check it) or choose another --out"
            ) from None
        except OSError:
            pass  # not writable: the claim says so
        else:
            probe.release(force=True)
    if holds_samples(out):
        for path in (out / CLAIM_FILE, out / RUN_FILE):
            if path.exists():
                _require_same(out, path, _read_json(path), config_hash, config)


def _refuse_foreign(out: Path) -> None:
    """InputError for a file, an unreadable folder, or a folder with visible files and no run of this tool
    (hidden files, and the empty `shards/` and `manifest/` a claim that never finished left, do not count)."""
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder; choose another --out")
        if not out.is_dir() or any(p.exists() for p in (out / CLAIM_FILE, out / RUN_FILE)):
            return
        foreign = sorted(
            p.name
            for p in out.iterdir()
            if not p.name.startswith(".") and not (p.name in _WORK_DIRS and p.is_dir() and not any(p.iterdir()))
        )
    except OSError as e:
        raise InputError(f"{out}: cannot be read ({e.strerror or e}); choose a readable, writable --out") from e
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"{out}: not empty ({shown}) and holds no run of this tool; choose another --out or empty it")


def _make_writable_folders(out: Path, subfolders: tuple[str, ...]) -> None:
    """Create `out` and its `subfolders` and write (then remove) a probe file in each, so a read-only or
    permission-denied folder is found before any generation."""
    for folder in (out, *(out / name for name in subfolders)):
        probe = tmp_name(folder / "write-probe")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "xb"):
                pass
            os.unlink(probe)
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise InputError(f"{folder}: cannot write here ({reason}); choose a writable --out") from e


def _lock_key(out: Path) -> str:
    return str(out.resolve())


def _lock(out: Path) -> None:
    """Take `out/.augment.lock` for this process (once), or raise InputError naming the process that holds it."""
    key = _lock_key(out)
    if key in _HELD:
        return
    path = out / LOCK_FILE

    def record_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.pwrite(fd, json.dumps(holder).encode(), 0)

    lock = FileLock(path, timeout=0, thread_local=False, fallback_to_soft=False, on_acquired=record_holder)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(
            f"{out}: another run is writing to this folder ({_describe_holder(path)}); wait for it to "
            "finish (rerun then to check it) or choose another --out"
        ) from None
    except OSError as e:
        raise InputError(f"{out}: cannot write here ({e.strerror or e}); choose a writable --out") from e
    _HELD[key] = lock


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"it holds {path}"


def _check_or_claim(out: Path, config_hash: str, config: dict[str, Any], *, may_reclaim: bool) -> bool:
    # The claim first: it stores the config in the same shape as `config` (run.json may hold more).
    recorded = [p for p in (out / CLAIM_FILE, out / RUN_FILE) if p.exists()]
    if not recorded:
        return _claim(out, config_hash, config)
    try:
        for path in recorded:
            _require_same(out, path, _read_json(path), config_hash, config)
    except InputError:
        if not may_reclaim or holds_samples(out):
            raise
        # claimed by a run that failed before writing any sample: the folder is free for this one
        atomic_write_json(out / CLAIM_FILE, {"config_hash": config_hash, "config": config})
        return False
    return True


def _claim(out: Path, config_hash: str, config: dict[str, Any]) -> bool:
    """Create the claim exclusively (link, not replace): with racing processes exactly one wins."""
    claim = out / CLAIM_FILE
    tmp = tmp_name(claim)
    data = dumps_json({"config_hash": config_hash, "config": config}).encode("utf-8")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, claim)
        except FileExistsError:
            _require_same(out, claim, _read_json(claim), config_hash, config)
            return True  # claimed concurrently by another process of the same run
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return False


def _require_same(out: Path, path: Path, stored: dict[str, Any], config_hash: str, config: dict[str, Any]) -> None:
    if stored.get("config_hash") == config_hash:
        return
    old = stored.get("config")
    if isinstance(old, dict):
        diffs = _differences(_flatten(old), _flatten(json.loads(dumps_json(config, indent=None))))
        shown = "; ".join(diffs[:_SHOWN_DIFFS]) + (
            f"; ... ({len(diffs) - _SHOWN_DIFFS} more)" if len(diffs) > _SHOWN_DIFFS else ""
        )
        detail = f"differs in {shown}" if diffs else "same settings but a different config hash (other version?)"
    else:
        detail = f"config hash {str(stored.get('config_hash'))[:12]} != {config_hash[:12]}"
    raise InputError(
        f"{out}: holds a run with a different configuration ({detail}); choose another --out or delete that folder"
    )


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key in sorted(obj):
            out.update(_flatten(obj[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if value is not _MISSING else "(absent)"
    return text if len(text) <= 30 else text[:27] + "..."


_MISSING = object()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for differing keys; keys only in `old` last (often runtime fields)."""
    keys = sorted(new) + sorted(set(old) - set(new))
    return [
        f"{key}: {_short(old.get(key, _MISSING))} -> {_short(new.get(key, _MISSING))}"
        for key in keys
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    ]


def check_or_record_inputs(out_dir: str | os.PathLike[str], inputs: dict[str, Any]) -> None:
    """Record `inputs` (e.g. the references' content hash and the model id) in `out_dir/.inputs.json`,
    or check that they equal the recorded ones: the same settings with other references or another
    model must not resume into this folder once it holds samples (before that, the new inputs are
    recorded instead: a run that failed before its first sample holds nothing hostage).

    Raises:
        InputError: the folder holds a run made from other inputs (the message names what changed).
    """
    path = Path(out_dir) / INPUTS_FILE
    if not path.is_file() or not holds_samples(out_dir):
        atomic_write_json(path, inputs)
        return
    stored = _read_json(path)
    changed = [f"{k}: {stored.get(k)} -> {v}" for k, v in inputs.items() if stored.get(k) != v]
    if changed:
        raise InputError(
            f"{out_dir}: holds a run made from other inputs ({'; '.join(changed)}); "
            "choose another --out or delete that folder"
        )


def write_job_spec(
    path: str | os.PathLike[str], config: dict[str, Any], shard_ranges: Iterable[Sequence[int]], **extra: Any
) -> Path:
    """Write the job spec worker processes read (`config`: the config as JSON; `shard_ranges`: the shard
    ids to do as half-open `[start, stop)` ranges, so the spec's size does not grow with the job's)."""
    ranges = [[int(start), int(stop)] for start, stop in shard_ranges]
    return atomic_write_json(path, {"config": config, "shard_ranges": ranges, **extra})


def read_job_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The job spec written by `write_job_spec`: a dict with `config` (dict) and `shard_ranges` (a list of
    `[start, stop)` pairs of shard ids).

    Raises:
        InputError: the file is missing, unreadable, or not a job spec.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such job spec (write it with `prepare` first)")
    spec = _read_json(path)
    ranges = spec.get("shard_ranges")
    pairs = isinstance(ranges, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(i, int) and i >= 0 for i in r) for r in ranges
    )
    if not isinstance(spec.get("config"), dict) or not pairs:
        raise InputError(
            f"{path}: not a job spec of this version (needs 'config' and 'shard_ranges'); write it again with `prepare`"
        )
    return spec
