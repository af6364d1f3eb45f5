"""The domain suite's pieces: domain splits, garbage and class-histogram metrics, the results section."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluation.domains import DOMAINS, make_domain
from pipeline.evaluation.metrics import class_histogram, garbage

REPO = Path(__file__).resolve().parents[1]


def _digits(n_per_class: int = 100):
    """Synthetic 28×28 'digits' (a bar whose position encodes the class), rows 0..N-1."""
    images, labels = [], []
    for c in range(10):
        for _ in range(n_per_class):
            img = np.zeros((28, 28), dtype=np.uint8)
            img[6:22, 2 + 2 * c : 5 + 2 * c] = 255
            images.append(img)
            labels.append(c)
    return np.stack(images), np.asarray(labels)


@pytest.mark.parametrize("name", list(DOMAINS))
def test_every_domain_splits_disjointly_and_deterministically(name):
    images, labels = _digits()
    rows = np.arange(len(labels))[::2]  # a "held-out" subset of the rows
    spec = DOMAINS[name]
    d = make_domain(spec, images, labels, rows)
    assert set(d.ref_rows).isdisjoint(d.test_rows) and set(d.ref_rows) | set(d.test_rows) <= set(rows)
    assert {c: int((d.ref_labels == c).sum()) for c in spec.references} == spec.references
    assert set(d.test_labels) == set(spec.references)  # every other row of the domain's classes is a test image
    assert len(d.test_rows) == sum(int((labels[rows] == c).sum()) - k for c, k in spec.references.items())
    assert d.ref_images.shape == (len(d.ref_rows), 32, 32) and d.ref_images.dtype == np.uint8
    again = make_domain(spec, images, labels, rows)
    assert np.array_equal(again.ref_images, d.ref_images) and np.array_equal(again.test_images, d.test_images)


def test_shifts_do_what_they_say():
    images, labels = _digits(1)
    plain = DOMAINS["subset"].shift(images, np.random.default_rng(0)).astype(float)
    rng = np.random.default_rng(0)
    ink = lambda x: float((x > 127).mean())  # noqa: E731
    assert ink(DOMAINS["thick"].shift(images, rng)) > 1.5 * ink(plain)
    assert ink(DOMAINS["thin"].shift(images, rng)) < 0.8 * ink(plain)
    grey = DOMAINS["contrast"].shift(images, rng)
    assert abs(int(grey.min()) - 0.3 * 255) <= 1 and abs(int(grey.max()) - 0.7 * 255) <= 1  # 0.3 + 0.4 v
    assert ink(DOMAINS["scale"].shift(images, rng)) < 0.6 * ink(plain)
    noisy = DOMAINS["noise"].shift(images, rng).astype(float)
    assert 0.1 * 255 < np.std(noisy - plain) < 0.25 * 255


def test_garbage_counts_only_samples_far_from_every_real_image():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    near = real[:10] + 0.01
    far = torch.full((3, 4), 50.0, dtype=torch.float64)
    out = garbage(torch.cat([near, far]), real)
    assert out["count"] == 3 and out["mask"] == [False] * 10 + [True] * 3
    assert garbage(real, real)["rate"] == 0.0  # real data is never garbage by construction


def test_class_histogram_deviation_in_shares():
    planned = [0.5, 0.25, 0.25]
    exact = class_histogram(torch.tensor([0, 0, 1, 2]), planned)
    assert exact["counts"] == [2, 1, 1] and exact["max_deviation"] == 0.0
    off = class_histogram(torch.tensor([0, 0, 0, -1]), planned)
    assert off["other"] == 1 and off["max_deviation"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("domain_suite", REPO / "benchmarks" / "domain_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["domain_suite"] = module
    spec.loader.exec_module(module)
    return module


def test_arms_parse(suite):
    assert suite.arm_settings("default") == {}
    assert suite.arm_settings("unguided") == {"guidance": "none"}
    assert suite.arm_settings("noisy@auto") == {"guidance": "noisy", "strength": "auto"}
    assert suite.arm_settings("latent@0.02") == {"guidance": "latent", "strength": 0.02}
    assert suite.arm_settings("default,cfg_scale=2,label_filter=true") == {"cfg_scale": 2, "label_filter": True}
    with pytest.raises(SystemExit):
        suite.arm_settings("latent")


def test_results_section_is_replaced_between_markers(suite, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n")
    suite.write_section(doc, f"{suite.START}\nfirst\n{suite.END}")
    suite.write_section(doc, f"{suite.START}\nsecond\n{suite.END}")
    text = doc.read_text()
    assert text.count("## 5. Domain suite") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n\nintro\n")
