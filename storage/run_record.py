"""`run.json`, the guards of an output folder, and the job spec that worker processes read.

`check_or_claim_output` runs before anything else is written to `--out`: a fresh folder is claimed
(`.config-claim.json` holds the config hash and config); the same configuration resumes; a different
one is refused with a message that names the first differing keys. `check_or_record_inputs` does the
same for what the settings do not name: the references' content and the model (`.inputs.json`).

The job spec (`write_job_spec`/`read_job_spec`) is what `accelerate launch -m pipeline.distributed SPEC`
reads on every machine: the config and the ids of the shards to do.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from storage._atomic import atomic_write_json, dumps_json, tmp_name
from storage.errors import InputError

__all__ = [
    "CLAIM_FILE",
    "INPUTS_FILE",
    "RUN_FILE",
    "check_or_claim_output",
    "check_or_record_inputs",
    "read_job_spec",
    "read_run_record",
    "write_job_spec",
    "write_run_record",
]

RUN_FILE = "run.json"
CLAIM_FILE = ".config-claim.json"
#: Records which references and model a folder's samples were made from (guards resumption).
INPUTS_FILE = ".inputs.json"
_SHOWN_DIFFS = 3


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


def check_or_claim_output(out_dir: str | os.PathLike[str], config_hash: str, config: dict[str, Any]) -> bool:
    """Claim `out_dir` for this configuration, or confirm it already holds the same one.

    Creates the folder if needed.

    Returns:
        True if the folder holds a run with the same `config_hash` (resume), False if it was fresh
        and is now claimed.

    Raises:
        InputError: the folder holds a run with another configuration, or is not empty and holds no
            run at all (files other than hidden ones), or is a file.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    # The claim first: it stores the config in the same shape as `config` (run.json may hold more).
    recorded = [p for p in (out / CLAIM_FILE, out / RUN_FILE) if p.exists()]
    if recorded:
        for path in recorded:
            _require_same(out, path, _read_json(path), config_hash, config)
        return True
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"{out}: not empty ({shown}) and holds no run of this tool; choose another --out or empty it")
    return _claim(out, config_hash, config)


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
    model must not resume into this folder.

    Raises:
        InputError: the folder holds a run made from other inputs (the message names what changed).
    """
    path = Path(out_dir) / INPUTS_FILE
    if not path.is_file():
        atomic_write_json(path, inputs)
        return
    stored = _read_json(path)
    changed = [f"{k}: {stored.get(k)} -> {v}" for k, v in inputs.items() if stored.get(k) != v]
    if changed:
        raise InputError(
            f"{out_dir}: holds a run made from other inputs ({'; '.join(changed)}); "
            "choose another --out or delete that folder"
        )


def write_job_spec(path: str | os.PathLike[str], config: dict[str, Any], shards: list[int], **extra: Any) -> Path:
    """Write the job spec worker processes read (`config`: the config as JSON; `shards`: ids to do)."""
    return atomic_write_json(path, {"config": config, "shards": [int(s) for s in shards], **extra})


def read_job_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The job spec written by `write_job_spec`: a dict with `config` (dict) and `shards` (list of ids).

    Raises:
        InputError: the file is missing, unreadable, or not a job spec.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such job spec (write it with `prepare` first)")
    spec = _read_json(path)
    if not isinstance(spec.get("config"), dict) or not isinstance(spec.get("shards"), list):
        raise InputError(f"{path}: not a job spec (needs 'config' and 'shards')")
    return spec
