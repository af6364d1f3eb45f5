"""The seams between the packages: import-linter's contracts (pyproject.toml) hold, no package reaches
into another's private names (`_name`, `pkg._module`): what others need is promoted to a public name, and
no module imports itself back through others (imports inside functions included), and no function is
longer than a reader can hold (MAX_FUNCTION_LINES)."""

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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (any import statement, at any depth of the file)."""
    paths = {_module_name(path): path for top in PACKAGES for path in sorted((REPO / top).rglob("*.py"))}

    def known(name: str) -> str | None:  # the longest prefix of a dotted name that is a module of the project
        parts = name.split(".")
        while parts and ".".join(parts) not in paths:
            parts.pop()
        return ".".join(parts) or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        imported: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:  # `from pkg import module` imports the module, else pkg itself
                    name = f"{base}.{alias.name}"
                    imported.add(name if name in paths else known(base))
        graph[module] = {m for m in imported if m is not None and m != module}
    return graph


def test_no_import_cycle_between_modules():
    graph = _module_graph()
    assert "pipeline.models.generation" in graph["pipeline.jobs.worker"]  # the graph sees the project's imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -r requirements.lock)")
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


MAX_FUNCTION_LINES = 80


def _long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (methods and nested ones included) longer than `limit` lines, def line to the last
    line of its body, decorators excluded: `path:line name (n lines)`."""
    found = []
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_80_lines():
    assert _long_functions() == [], "functions a reader can hold: split these where the parts have names"
