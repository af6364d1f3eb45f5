"""Fuzz the CLI with random flag values and random reference folders: every run ends in exit 0 or 2,
never a traceback, and a refused run (exit 2) writes nothing to --out (issue 16)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from test_cli import CLI_VALUES, cli_args, invoke, tiny  # noqa: F401  (tiny is a fixture)
from tiny_models import write_reference_folder

from pipeline.cli.options import flag_fields

#: Values that are wrong for most fields, plus edge cases that are valid for some.
ODD_VALUES = ["-1", "0", "1e30", "nan", "inf", "-inf", "abc", "", "3.5", "0.5,0.5", "none", "1,2,3", "10000000000"]
NOT_FUZZED = {"ref", "out", "cache_dir", "model", "processes", "device", "progress", "dtype"}


def random_refs(rng: random.Random, root: Path, tiny_refs: str) -> str:
    """A reference folder of a random kind: missing, empty, non-images, truncated PNGs, nested, or valid."""
    kind = rng.choice(["missing", "empty", "bytes", "truncated", "valid", "valid", "nested", "file"])
    path = root / f"refs-{kind}-{rng.randrange(10**6)}"
    if kind == "missing":
        return str(path)
    if kind == "file":
        path.write_bytes(rng.randbytes(64))
        return str(path)
    if kind in ("valid", "truncated", "nested"):
        shutil.copytree(tiny_refs, path)
        pngs = sorted(path.rglob("*.png"))
        if kind == "truncated":
            victim = rng.choice(pngs)
            victim.write_bytes(victim.read_bytes()[: rng.randrange(1, 40)])
        if kind == "nested":
            deep = pngs[0].parent / "deeper"
            deep.mkdir()
            shutil.copy(pngs[0], deep / "x.png")
        return str(path)
    path.mkdir()
    if kind == "bytes":
        for i in range(rng.randrange(1, 12)):
            (path / f"img{i}{rng.choice(['.png', '.jpg', '.txt', ''])}").write_bytes(
                rng.randbytes(rng.randrange(0, 300))
            )
    return str(path)


def random_flags(rng: random.Random) -> list[str]:
    fields = [name for name in flag_fields() if name not in NOT_FUZZED]
    values: dict[str, object] = {}
    for name in rng.sample(fields, rng.randrange(1, 6)):
        valid = CLI_VALUES[name]
        values[name] = (
            rng.choice([valid, rng.choice(ODD_VALUES)]) if not isinstance(valid, bool) else rng.random() < 0.5
        )
    return cli_args(values)


def check(result, out: Path) -> None:
    output = result.output
    assert result.exit_code in (0, 2, 3), (result.exit_code, output[-2000:])  # 3: finished short
    assert "Traceback" not in output, output[-2000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 2:
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


@pytest.mark.parametrize("seed", range(40))
def test_random_flags_and_references_dry_run(seed: int, tmp_path: Path, tiny) -> None:  # noqa: F811
    rng = random.Random(seed)
    refs = random_refs(rng, tmp_path, tiny["refs"])
    out = tmp_path / "out"
    args = ["--ref", refs, "--out", str(out), "--cache-dir", tiny["cache"], "--progress", "quiet", "--dry-run"]
    result = invoke(args + random_flags(rng))
    check(result, out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_random_flags_real_runs_on_a_tiny_model(seed: int, tmp_path: Path, tiny) -> None:  # noqa: F811
    rng = random.Random(1000 + seed)
    refs = random_refs(rng, tmp_path, tiny["refs"]) if seed % 2 else str(write_reference_folder(tmp_path / "r"))
    out = tmp_path / "out"
    base = ["--ref", refs, "--out", str(out), "--model", tiny["dit"], "--cache-dir", tiny["cache"]]
    base += ["--n", "2", "--shard-size", "2", "--steps", "2", "--strength", "0.01", "--progress", "quiet"]
    base += ["--pilot-samples", "8"]
    result = invoke(base + random_flags(rng))
    check(result, out)
