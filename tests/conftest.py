"""Shared test configuration: `gpu` tests are skipped without CUDA; threads capped for a 2-core CI."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def unprivileged(tmp_path_factory):
    """(folder, drop): a temporary folder any user can reach, and a context manager inside which file
    permission bits apply even to root (root's effective ids become nobody's; a no-op for other users)."""
    import contextlib
    import os
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="mmd-augment-perm-"))
    folder.chmod(0o755)

    @contextlib.contextmanager
    def drop():
        if os.geteuid() != 0:
            yield
            return
        os.setegid(65534)
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    yield folder, drop
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


@pytest.fixture
def hold_output_lock():
    """hold(out, config_hash="h1", config=None) -> a child process that has claimed `out` (and holds its
    lock, as a running `augment` does) until the test ends or kills it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    children: list[subprocess.Popen] = []

    def hold(out, config_hash: str = "h1", config: dict | None = None) -> subprocess.Popen:
        code = (
            "import sys, time; from storage.run_record import claim_output; "
            f"claim_output({str(out)!r}, {config_hash!r}, {config or {'n': 1}!r}); print('held', flush=True); "
            "time.sleep(120)"
        )
        env = {**os.environ, "PYTHONPATH": str(repo)}
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=repo, env=env)
        children.append(child)
        assert child.stdout.readline().strip() == "held"
        return child

    yield hold
    for child in children:
        child.kill()  # like kill -9: the OS releases the lock
        child.wait()
        child.stdout.close()
