"""The seams between the packages: import-linter's contracts (pyproject.toml) hold, and no package reaches
into another's private names (`_name`, `pkg._module`): what others need is promoted to a public name."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("guidance", "pipeline", "storage", "flows")


def _private_imports_across_packages() -> list[str]:
    found = []
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules, names = [node.module], [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    modules, names = [a.name for a in node.names], []
                else:
                    continue
                for module in modules:
                    parts = module.split(".")
                    if parts[0] not in PACKAGES or parts[0] == top:
                        continue
                    private = [p for p in parts if p.startswith("_")] + [n for n in names if n.startswith("_")]
                    if private:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {module} {private}")
    return found


def test_no_package_imports_another_packages_private_names():
    assert _private_imports_across_packages() == []


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -r requirements.lock)")
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
