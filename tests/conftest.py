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
