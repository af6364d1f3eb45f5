"""A run's output folder behind one object: everything a run reads and writes in `--out`.

    folder = RunFolder(cfg.out, cfg.prefix)
    folder.check_free(config_hash, config)   # read-only: before the model loads, and for --dry-run
    folder.claim(config_hash, config)        # lock + one configuration per folder + a new run token
    folder.record_inputs({...}); folder.save_reach(r); folder.save_pilot(r)
    folder.clean_partial(); folder.forget_shards_without_part()
    folder.pending(num_shards)  /  folder.not_done(shard_ids)
    folder.write_shard(...); folder.write_manifest_part(...)   # the worker's writes
    folder.merge_manifest(num_shards); folder.write_run_record(r); folder.release()

What it owns on disk: `.augment.lock` and `.config-claim.json` (`storage.run_record`: one run at a time, one
configuration per folder), `.run-token` (which run the temporary files belong to), `.inputs.json`,
`reach.json`, `pilot.json`, `shards/` with their done markers, `rejected/`, `manifest/` parts and
`manifest.parquet`, and `run.json`.

Temporary files belong to a run by its token, not by a pid: `claim` writes a fresh token and every process of
the run (this one, its `accelerate` workers, node runs on other machines: `join`) names its temporary files
`<name>.tmp-<token>-<random>`. `clean_partial` removes every temporary file of any other token, so a crashed
run's half-written shard is removed even when the restarted process got the same pid.

Out of disk space (`ENOSPC`, `EDQUOT`) while the run writes is `OutOfSpace`, an `InputError` naming the folder and
the space a finished shard takes (`writing`): the atomic writers leave no partial file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from storage import atomic, manifest, pilot, reach, run_record, shards
from storage.errors import InputError

__all__ = ["OutOfSpace", "RunFolder"]

TOKEN_FILE = ".run-token"
#: What a run writes at its start besides the claim: removed again if it fails before its first sample.
RUN_RECORDS = (run_record.INPUTS_FILE, pilot.PILOT_FILE, reach.REACH_FILE, TOKEN_FILE)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutOfSpace(InputError):
    """The disk holding the run folder is full: a rerun with space resumes the run byte-identically."""


class RunFolder:
    """The output folder of one run (`out`) and its shard file prefix."""

    def __init__(self, out: str | os.PathLike[str], prefix: str = "synthetic") -> None:
        self.out = Path(out)
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"RunFolder({str(self.out)!r}, prefix={self.prefix!r})"

    # ---- the claim ------------------------------------------------------------------------------------

    def check_free(self, config_hash: str, config: dict[str, Any]) -> None:
        """Raise InputError, writing nothing, when `claim` would refuse: a file, a foreign folder, another
        configuration's samples, a run writing to it now."""
        run_record.check_claimable(self.out, config_hash, config)

    def claim(self, config_hash: str, config: dict[str, Any]) -> bool:
        """Lock the folder for this process and claim it for this configuration (True: a resume), then give
        the run a fresh token for its temporary files."""
        resumed = run_record.claim_output(self.out, config_hash, config)
        try:
            token = secrets.token_hex(8)
            atomic.atomic_write_bytes(self.out / TOKEN_FILE, token.encode())
            atomic.set_run_token(token)
        except BaseException:
            run_record.release_output(self.out)
            raise
        return resumed

    def join(self, config_hash: str | None = None, config: dict[str, Any] | None = None) -> None:
        """A process of a run another process claimed (a worker, a node run): check the configuration when
        given, and name this process's temporary files with the run's token."""
        if config_hash is not None and config is not None:
            run_record.check_or_claim_output(self.out, config_hash, config)
        atomic.set_run_token(self.token)

    @property
    def claimed(self) -> bool:
        return (self.out / run_record.CLAIM_FILE).exists()

    @property
    def token(self) -> str | None:
        """The token of the run that claimed the folder last (None before any claim)."""
        try:
            return (self.out / TOKEN_FILE).read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        """Release this process's lock (a no-op if it holds none)."""
        run_record.release_output(self.out)

    def abandon(self) -> bool:
        """After a failure: undo this run's claim when it wrote no sample (True), and release the lock."""
        return run_record.abandon_output(self.out, records=RUN_RECORDS)

    # ---- records --------------------------------------------------------------------------------------

    def record_inputs(self, inputs: dict[str, Any]) -> None:
        """Record what the settings do not name (references' content, model), or check it on a resume."""
        run_record.check_or_record_inputs(self.out, inputs)

    def save_reach(self, record: dict[str, Any]) -> None:
        reach.save_reach(self.out, record)

    def load_reach(self) -> dict[str, Any] | None:
        return reach.load_reach(self.out)

    def save_pilot(self, record: dict[str, Any]) -> None:
        pilot.save_pilot(self.out / pilot.PILOT_FILE, record)

    def load_pilot(self, key: str) -> dict[str, Any] | None:
        return pilot.load_pilot(self.out / pilot.PILOT_FILE, key)

    def write_run_record(self, record: dict[str, Any]) -> None:
        with self.writing():
            run_record.write_run_record(self.out, record)

    def read_run_record(self) -> dict[str, Any] | None:
        return run_record.read_run_record(self.out)

    def require_finished(self) -> dict[str, Any]:
        """`run.json` of a finished run (`augment eval`, `augment utility`); InputError naming what is missing
        when the folder holds no run or an unfinished one."""
        record = run_record.read_run_record(self.out)
        if record is None:
            raise InputError(f"{self.out}: no run.json (not an `augment` output folder, or the run has not finished)")
        if not self.manifest_path.is_file():
            raise InputError(f"{self.manifest_path}: missing (the run has not finished)")
        return record

    # ---- shards ---------------------------------------------------------------------------------------

    def clean_partial(self) -> list[Path]:
        """Remove the temporary files of every run but the current one (crashed writers)."""
        return shards.clean_partial(self.out, keep_token=self.token)

    def forget_shards_without_part(self) -> list[int]:
        """Make shards whose manifest part is lost pending again (their markers vouch for the part)."""
        return manifest.forget_shards_without_part(self.out, self.prefix)

    def done_ids(self) -> list[int]:
        """Shards with a done marker, ascending (listed, not verified)."""
        return shards.done_shard_ids(self.out, self.prefix)

    def is_done(self, shard_id: int) -> bool:
        """The shard's marker vouches for its bytes (size and sha256)."""
        return shards.is_done(self.out, self.prefix, shard_id)

    def done_among(self, num_shards: int) -> list[int]:
        """The verified done shards of a plan of `num_shards`."""
        return [sid for sid in self.done_ids() if sid < num_shards and self.is_done(sid)]

    def read_marker(self, shard_id: int) -> dict[str, Any] | None:
        return shards.read_marker(self.out, self.prefix, shard_id)

    def shard_path(self, shard_id: int) -> Path:
        return shards.shard_path(self.out, self.prefix, shard_id)

    def write_shard(self, shard_id: int, samples: Iterable[dict[str, Any]], marker_info: dict[str, Any]) -> Path:
        """The shard's kept samples, atomically, then its done marker (write its manifest part first)."""
        with self.writing():
            return shards.write_shard(self.out, self.prefix, shard_id, samples, marker_info=marker_info)

    def write_rejected(self, shard_id: int, samples: Iterable[dict[str, Any]]) -> Path:
        """The shard's rejected samples, for audit (`--keep-rejected`)."""
        with self.writing():
            return shards.write_shard(
                self.out, f"{self.prefix}_rejected", shard_id, samples, folder=shards.REJECTED_DIR
            )

    def write_manifest_part(self, shard_id: int, rows: list[dict[str, Any]]) -> Path:
        with self.writing():
            return manifest.write_manifest_part(self.out, shard_id, rows)

    def merge_manifest(self, num_shards: int) -> Path:
        """`manifest.parquet` from every shard's part (each of the plan's shards must have one)."""
        with self.writing():
            return manifest.merge_manifest(self.out, expected_shards=range(num_shards))

    @property
    def manifest_path(self) -> Path:
        return self.out / manifest.MANIFEST_FILE

    def manifest_batches(self, columns: Iterable[str]) -> Iterator[dict[str, list[Any]]]:
        """The merged manifest's `columns`, one shard's part at a time (memory bounded by a shard)."""
        return manifest.manifest_rows(self.manifest_path, list(columns))

    def discard_samples(self) -> None:
        """Remove every sample, part and the merged manifest (a run that kept nothing)."""
        run_record.discard_samples(self.out)

    # ---- space ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Turn a full disk into `OutOfSpace` (one line: the folder, the free space, what a shard takes)."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            raise OutOfSpace(self.no_space_message()) from exc

    def out_of_space(self) -> bool:
        """Less free space than a finished shard takes (1 MiB before any): what a failed worker is told by."""
        sizes = [int(m.get("size", 0)) for sid in self.done_ids()[:20] if (m := self.read_marker(sid))]
        return _free_bytes(self.out) < max([2**20, *sizes])

    def no_space_message(self) -> str:
        free = _free_bytes(self.out)
        sizes = [int(m.get("size", 0)) for sid in self.done_ids()[:20] if (m := self.read_marker(sid))]
        shard = f"; a finished shard here takes {_mib(max(sizes))}" if sizes else ""
        return (
            f"{self.out}: out of disk space ({_mib(free)} free{shard}); free space there (or use another --out), "
            "then rerun the same command to resume: the shards written so far are kept"
        )


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
