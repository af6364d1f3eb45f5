"""The methods study's bookkeeping: rerunning some rows keeps the others; tables show optional columns."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return _load("methods_study")


@pytest.fixture(scope="module")
def render():
    return _load("render_results")


def _row(domain: str, setting: str, mmd2: float) -> dict:
    return {"domain": domain, "setting": setting, "mmd2": mmd2}


def test_merge_rows_replaces_in_place_and_appends(study):
    previous = {
        "study": "coupling",
        "settings": {"n": 128, "out": "a"},
        "rows": [_row("thick", "x", 1.0), _row("thick", "y", 2.0)],
        "seconds": 10.0,
    }
    update = {
        "study": "coupling",
        "settings": {"n": 48, "out": "b", "only": ["y", "z"]},
        "rows": [_row("thick", "z", 4.0), _row("thick", "y", 3.0)],
        "seconds": 5.0,
    }
    merged = study.merge_rows(previous, update)
    assert [(r["setting"], r["mmd2"]) for r in merged["rows"]] == [("x", 1.0), ("y", 3.0), ("z", 4.0)]
    assert merged["seconds"] == 15.0
    assert merged["settings"]["n"] == 128 and merged["settings"]["rerun"] == {"n": 48, "only": ["y", "z"]}


def test_table_shows_a_column_only_when_every_row_has_it(render):
    rows = [{**_row("thick", "x", 0.5), "class_mmd2": 0.25}, {**_row("thick", "y", 0.5), "class_mmd2": 0.125}]
    for r in rows:
        r.update(kid=0.1, fd=1.0, precision=0.5, recall=0.5, coverage=0.5, class_acc=0.9, calls=50, sec=0.1)
    assert "per-class MMD²" in render.table(rows)
    assert "0.2500" in render.table(rows)
    del rows[1]["class_mmd2"]
    assert "per-class MMD²" not in render.table(rows)


def test_class_mmd2_matches_the_gaussian_closed_form(study):
    """Two classes, one shifted by m: mean of 0 and MMD²(N(0,I), N(m,I)) = 2a(1 − exp(−‖m‖²/(2(σ²+2)))),
    a = (σ²/(σ²+2))^{d/2}, for the RBF kernel exp(−‖x−y‖²/(2σ²))."""
    import torch

    from guidance import RBFKernel

    gen = torch.Generator().manual_seed(0)
    n, d, sigma = 2000, 2, 1.0
    y, yd = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.arange(n) % 2
    x, xd = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.arange(n) % 2
    x[xd == 1] += 1.0
    a = (sigma**2 / (sigma**2 + 2)) ** (d / 2)
    closed = 2 * a * (1 - torch.exp(torch.tensor(-float(d) / (2 * (sigma**2 + 2))))).item()
    value = study.class_mmd2(x, xd, y, yd, RBFKernel(sigma))
    assert value == pytest.approx(closed / 2, abs=0.01)
    assert study.class_mmd2(y, yd, y, yd, RBFKernel(sigma)) < 0.002
